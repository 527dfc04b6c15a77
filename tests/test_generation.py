"""Generation: tasks and data files with reference answers, target-likelihood scoring on every path,
greedy generation with a soft prompt, text metrics, and the CLI end to end (tiny model; the real default
model in the tests marked slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bbpt.errors import ConfigError, DataError
from bbpt.prompt import PromptInit
from bbpt.tasks import Example, Template, load_task
from bbpt.tasks.generation import read_generation
from study_helpers import cli, optimize_args


def _backend(tiny_model_dir, **kw):
    from adapters.hf import HFBackend

    b = HFBackend(tiny_model_dir, device="cpu", **kw)
    b.set_init(PromptInit("vocab", 3))
    return b


# -- tasks and data ------------------------------------------------------------------------------------------
def test_e2e_splits_by_mr_keeps_every_test_reference_and_depends_only_on_the_seed():
    a = load_task(task="e2e", shots=8, seed=1, max_test=20)
    b = load_task(task="e2e", shots=8, seed=1, max_test=20)
    c = load_task(task="e2e", shots=8, seed=2, max_test=20)
    assert a.kind == "generation" and len(a.train) == 8 and len(a.dev) == 8 and len(a.test) == 20
    assert [e.text for e in a.train] == [e.text for e in b.train] != [e.text for e in c.train]
    assert not {e.text for e in a.train} & {e.text for e in a.dev}          # split by MR, never by row
    assert all(len(e.targets) == 1 for e in a.train)                          # one reference to train on
    assert max(len(e.targets) for e in a.test) > 1                            # BLEU is multi-reference
    assert all(t.startswith(" ") for e in a.test for t in e.targets)          # after the cue's colon


def test_prompt_completion_and_chat_rows_are_read(tmp_path):
    p = tmp_path / "answers.jsonl"
    p.write_text(json.dumps({"prompt": "Q: 2+2?", "completion": " 4"}) + "\n" + json.dumps({"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}]}) + "\n")
    plain, chat = read_generation(p)
    assert plain == Example("Q: 2+2?", targets=(" 4",))
    assert chat.targets == ("Hello.",) and chat.chat == (("system", "Be brief."), ("user", "Hi"))


@pytest.mark.parametrize("row, says", [
    ({"prompt": "x"}, "neither"),
    ({"prompt": "x", "completion": "  "}, "empty completion"),
    ({"completion": "y"}, 'no "prompt"'),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"},
                   {"role": "user", "content": "more?"}]}, "ends with a 'user' turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}, "empty"),
    ({"messages": [{"role": "boss", "content": "hi"}, {"role": "assistant", "content": "a"}]}, "role 'boss'"),
])
def test_malformed_generation_rows_name_the_line_and_the_fix(tmp_path, row, says):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"prompt": "ok", "completion": " fine"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=f"bad.jsonl:2.*{says}"):
        read_generation(p)


def test_a_generation_file_that_is_not_utf8_says_so(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes('{"prompt": "caf\u00e9", "completion": " yes"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="latin1.jsonl:1 is not UTF-8"):
        load_task(data=str(p), shots=1)


# -- scoring ------------------------------------------------------------------------------------------------
def _reference(backend, delta, ex: Example, template: Template) -> float:
    """The target's log-prob from one unpadded whole-sequence forward of the model itself."""
    import torch

    before, after = template.render(ex)
    tok, emb = backend.tokenizer, backend.embedding
    ids_b = tok(before, add_special_tokens=True)["input_ids"] if before else []
    ids_a = tok(after, add_special_tokens=not before)["input_ids"]
    target = backend.target_ids(ex.targets[0])
    p = backend.p0 + torch.as_tensor(delta)
    seq = torch.cat([emb(torch.tensor(ids_b, dtype=torch.long)), p, emb(torch.tensor(ids_a + target))])
    with torch.no_grad():
        lp = torch.log_softmax(backend.model(inputs_embeds=seq[None]).logits[0].float(), -1)
    start = seq.shape[0] - len(target) - 1
    return float(sum(lp[start + i, t] for i, t in enumerate(target)))


@pytest.mark.parametrize("position", ["prefix", "infix"])
def test_target_scores_are_exact_on_the_cached_and_uncached_paths(tiny_model_dir, position):
    task = load_task(task="e2e", shots=5, seed=0, prompt_position=position)
    deltas = np.random.default_rng(0).standard_normal((3, 3, 32)).astype(np.float32) * 0.1
    cached, plain = _backend(tiny_model_dir), _backend(tiny_model_dir, reuse_kv=False)
    a = cached.score(deltas, cached.encode(task.train, task.template, []))
    b = plain.score(deltas, plain.encode(task.train, task.template, []))
    assert a.logprobs.shape == (3, 5) and cached.stats["computed_tokens"] < plain.stats["computed_tokens"]
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
    ref = [_reference(plain, deltas[1], ex, task.template) for ex in task.train]
    np.testing.assert_allclose(b.logprobs[1], ref, atol=1e-4)
    # the end-of-sequence token is part of every target: a prompt learns to stop
    assert list(a.target_tokens) == [len(plain.target_ids(e.targets[0])) for e in task.train]


def test_the_differentiable_path_gives_the_same_scores_and_a_gradient(tiny_model_dir):
    import torch

    from bbpt.objective import target_loss

    task = load_task(task="e2e", shots=3, seed=0)
    b = _backend(tiny_model_dir)
    batch = b.encode(task.train, task.template, [])
    delta = torch.zeros(1, 3, 32, requires_grad=True)
    lp, _ = b.logprobs_torch(delta, batch)
    loss = target_loss(lp, batch.target_tokens)
    loss.sum().backward()
    expected = -float(lp.detach().sum()) / batch.target_tokens.sum()
    np.testing.assert_allclose(lp.detach().numpy(), b.score(np.zeros((1, 3, 32), np.float32), batch).logprobs,
                               atol=1e-4)
    assert float(delta.grad.abs().sum()) > 0
    assert float(loss.detach()) == pytest.approx(expected)


# -- generating -------------------------------------------------------------------------------------------
def test_generation_cached_equals_uncached_and_batched_equals_one_by_one(tiny_model_dir):
    task = load_task(task="e2e", shots=2, seed=0, max_test=6)
    b = _backend(tiny_model_dir)
    delta = np.random.default_rng(1).standard_normal((3, 32)).astype(np.float32) * 2.0
    cached = b.generate(delta, task.test, task.template, max_new_tokens=8)
    assert cached == b.generate(delta, task.test, task.template, max_new_tokens=8, use_cache=False)
    assert cached == [b.generate(delta, [e], task.template, max_new_tokens=8)[0] for e in task.test]


def test_no_prompt_generates_what_the_models_own_generate_does(tiny_model_dir):
    task = load_task(task="e2e", shots=2, seed=0, max_test=3)
    b = _backend(tiny_model_dir)
    ours = b.generate(None, task.test, task.template, max_new_tokens=10)
    for ex, text in zip(task.test, ours):
        ids = b.tokenizer(task.template.render_plain(ex), return_tensors="pt")["input_ids"]
        ref = b.model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=b.tokenizer.eos_token_id)
        assert text == b.tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)


def test_stop_strings_cut_the_answer():
    from adapters.hf import _cut

    assert _cut("A pub.\nNext", ["\n"]) == "A pub."
    assert _cut("no stop here", ["\n"]) == "no stop here"


# -- metrics ------------------------------------------------------------------------------------------------
def test_text_metrics_score_perfect_and_partial_answers():
    from bbpt.textmetrics import slot_coverage, text_metrics

    exs = [Example("name[The Eagle], area[riverside], familyFriendly[yes]",
                   targets=(" The Eagle is by the riverside.", " By the riverside: The Eagle."))]
    perfect = text_metrics(["The Eagle is by the riverside."], exs, slots=True)
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["rouge_l"] == pytest.approx(100.0)
    assert perfect["slot_coverage"] == 100.0 and perfect["bleu_signature"].startswith("nrefs:")
    assert slot_coverage(["The Eagle is great."], [exs[0].text]) == 50.0   # riverside missing
    assert text_metrics(["Nothing alike."], exs)["bleu"] < 10


# -- the study and the CLI ------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer, budget", [("backprop", 3), ("cma", 8)])
def test_optimize_e2e_then_generate_and_eval(tiny_model_dir, tmp_path, optimizer, budget):
    url = f"sqlite:///{tmp_path / 'g.db'}"
    args = optimize_args(tiny_model_dir, url, "gen", optimizer=optimizer, budget=budget, runs_dir=tmp_path / "runs")
    r = cli(args + ["--task", "e2e", "--max-new-tokens", "6"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["metric"] == "logprob" and s["calls"] == budget
    assert {"test_bleu", "test_rouge_l", "test_slot_coverage", "baseline_test_bleu"} <= set(s)
    assert s["best_train_loss"] > 0            # an NLL per target token, not a label loss
    saved = json.loads((tmp_path / "runs" / "gen" / "prompt.json").read_text())
    assert saved["kind"] == "generation" and saved["stop"] == ["\n"]
    r = cli(["generate", "--prompt", str(tmp_path / "runs" / "gen"), "--json", "--max-new-tokens", "5",
             "name[Zizzi], food[Italian]"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["input"] == "name[Zizzi], food[Italian]"
    r = cli(["eval", "--prompt", str(tmp_path / "runs" / "gen"), "--split", "dev", "--json"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert {"bleu", "rouge_l", "nll", "logprob"} <= set(json.loads(r.stdout))
    r = cli(["predict", "--prompt", str(tmp_path / "runs" / "gen"), "hello"], cwd=tmp_path)
    assert r.returncode == 2 and "bbpt generate" in r.stderr


def test_gn_and_discrete_spaces_are_refused_for_generation_before_anything_is_written(tiny_model_dir, tmp_path):
    from study_helpers import db_path

    url = f"sqlite:///{tmp_path / 'g.db'}"
    for extra, says in ((["--optimizer", "gn"], "gn models label scores"),
                        (["--space", "vocab"], "--space vocab is for classification")):
        args = optimize_args(tiny_model_dir, url, "refused", runs_dir=tmp_path / "runs")
        r = cli(args + ["--task", "e2e"] + extra, cwd=tmp_path)
        assert r.returncode == 2 and says in r.stderr, r.stderr
    assert not db_path(url).exists()


def test_gn_refusal_is_a_config_error():
    from bbpt.config import StudyConfig
    from bbpt.session import check_task

    with pytest.raises(ConfigError, match="use cma"):
        check_task(StudyConfig(task="e2e", optimizer="gn"), load_task(task="e2e", shots=2))


# -- the real default model -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_model_backprop_on_e2e_lowers_nll_and_answers_batched_as_alone(real_backend):
    import torch

    from bbpt.objective import target_loss
    from bbpt.session import resolve_init
    from bbpt.config import StudyConfig

    task = load_task(task="e2e", shots=4, seed=0, max_test=4)
    real_backend.set_init(resolve_init(StudyConfig(task="e2e"), task))
    batch = real_backend.encode(task.train, task.template, [])
    delta = torch.zeros(1, 10, 576, requires_grad=True)
    adam = torch.optim.Adam([delta], lr=0.01)
    losses = []
    for _ in range(3):
        lp, _ = real_backend.logprobs_torch(delta, batch)
        loss = target_loss(lp, batch.target_tokens).sum()
        adam.zero_grad()
        loss.backward()
        adam.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    d = delta.detach().numpy()[0]
    together = real_backend.generate(d, task.test, task.template, max_new_tokens=24, stop=["\n"])
    assert len(set(together)) > 1 and all(t.strip() for t in together)    # real, different answers
    assert together == [real_backend.generate(d, [e], task.template, max_new_tokens=24, stop=["\n"])[0]
                        for e in task.test]
    assert together == real_backend.generate(d, task.test, task.template, max_new_tokens=24, stop=["\n"],
                                             use_cache=False)


@pytest.mark.slow
def test_real_model_prompt_fitted_to_one_example_reproduces_its_target(real_backend):
    """The failure PEFT users keep reporting (peft #2123, #1391, #2043): a tuned prompt that generation
    ignores. Backprop a prompt onto one answer, then generate: the answer must come back, to the letter (the
    tiny random model cannot be fitted this way: its logits hardly move)."""
    import torch

    from bbpt.objective import target_loss

    ex = Example("name[Blue Spice], eatType[pub]", targets=(" Blue Spice is a pub by the river.",))
    template = Template("Data: {text}\nText:")
    real_backend.set_init(PromptInit("vocab", 4))
    batch = real_backend.encode([ex], template, [])
    delta = torch.zeros(1, 4, 576, requires_grad=True)
    adam = torch.optim.Adam([delta], lr=0.05)
    for _ in range(35):        # 30 steps reproduced it in a probe (loss 0.28); 35 leave a margin
        lp, _ = real_backend.logprobs_torch(delta, batch)
        loss = target_loss(lp, batch.target_tokens).sum()
        adam.zero_grad()
        loss.backward()
        adam.step()
    fitted = delta.detach().numpy()[0]
    assert real_backend.generate(fitted, [ex], template, max_new_tokens=20) == [ex.targets[0]]
    assert real_backend.generate(None, [ex], template, max_new_tokens=20) != [ex.targets[0]]


def test_a_generation_spec_runs_every_arm_and_reports_answers_scores(tmp_path, tiny_model_dir):
    from bbpt.cli import main

    spec = tmp_path / "gen.toml"
    spec.write_text(f"""
name = "gen"
model = {tiny_model_dir!r}
device = "cpu"
tasks = ["e2e"]
shots = 3
seeds = [0]
prompt_tokens = 3
max_test = 4
max_new_tokens = 5
[[arms]]
name = "manual"
optimizer = "manual"
[[arms]]
name = "icl2"
optimizer = "icl"
demos_per_class = 2
[[arms]]
name = "backprop"
optimizer = "backprop"
space = "full"
budget = 2
[[arms]]
name = "cma"
optimizer = "cma"
intrinsic_dim = 8
popsize = 4
budget = 8
""")
    assert main(["-q", "study", "run", str(spec), "--no-progress"]) == 0
    assert main(["-q", "study", "report", str(spec)]) == 0
    md = (tmp_path / "results" / "gen.md").read_text()
    assert "| arm | optimizer | seeds | dev NLL | test NLL | test BLEU |" in md
    for arm in ("manual", "icl2", "backprop", "cma"):
        row = next(line for line in md.splitlines() if line.startswith(f"| {arm} |"))
        assert "1/1" in row and row.count("(one seed)") == 5        # NLLs, BLEU, ROUGE-L, slot coverage


def _peft_generates_what_bbpt_generates(model_dir, tmp_path, steps: int, new_tokens: int):
    """Tune an e2e prompt, export it for PEFT, and compare PeftModel.generate's greedy tokens with bbpt's, on
    the test inputs; then import it back unchanged."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters.hf import HFBackend
    from bbpt.cli import main
    from bbpt.prompt import SavedPrompt

    url, runs = f"sqlite:///{tmp_path / 'g.db'}", tmp_path / "runs"
    assert main(["-q", "optimize", "--task", "e2e", "--model", model_dir, "--device", "cpu", "--optimizer",
                 "backprop", "--budget", str(steps), "--shots", "3", "--max-test", "4", "--prompt-tokens", "4",
                 "--max-new-tokens", "4", "--study", "gen", "--storage", url, "--runs-dir", str(runs),
                 "--no-progress"]) == 0
    assert main(["-q", "export", "gen", "--format", "peft", "--out", str(tmp_path / "peft"), "--storage", url,
                 "--runs-dir", str(runs)]) == 0
    saved = SavedPrompt.load(runs / "gen")
    task = load_task(task="e2e", shots=3, seed=0, max_test=4)
    ours = HFBackend(model_dir, device="cpu")
    ours.set_init(PromptInit("zeros", 4))
    mine = [r["ids"] for r in ours.generate_rows(saved.prompt, task.test, task.template, max_new_tokens=new_tokens)]
    base = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(tmp_path / "peft")).eval()
    tok = AutoTokenizer.from_pretrained(base)
    for ex, ids in zip(task.test, mine):
        enc = tok(task.template.render_plain(ex), return_tensors="pt")
        with torch.no_grad():
            # use_cache=False: PEFT 0.21's cached prompt-tuning generate goes wrong after the first token under
            # transformers 5.24 (measured: the second token differs; the failure of peft #1391), while bbpt's
            # cached path equals its uncached one and transformers' own generate on the same embeddings.
            out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.eos_token_id, use_cache=False)
        theirs = [t for t in out[0, enc["input_ids"].shape[1]:].tolist() if t != tok.eos_token_id]
        assert theirs == ids
    assert main(["-q", "import-peft", str(tmp_path / "peft"), "--out", str(tmp_path / "back")]) == 0
    back = SavedPrompt.load(tmp_path / "back")
    np.testing.assert_array_equal(back.prompt, saved.prompt)
    assert back.meta["kind"] == "generation"
    return mine


def test_peft_generates_the_greedy_tokens_bbpt_generates_tiny(tiny_model_dir, tmp_path):
    _peft_generates_what_bbpt_generates(tiny_model_dir, tmp_path, steps=2, new_tokens=6)


@pytest.mark.slow
def test_peft_generates_the_greedy_tokens_bbpt_generates_default_model(default_model_dir, tmp_path):
    answers = _peft_generates_what_bbpt_generates("smollm2-135m", tmp_path, steps=2, new_tokens=24)
    assert len({tuple(a) for a in answers}) > 1          # real, different answers were compared


def test_the_serve_protocol_carries_targets_and_scores_equal_the_local_ones(tiny_model_dir, tmp_path):
    """Black-box generation behind `bbpt serve`: targets travel with the examples, and the target log-probs
    (split over several requests by the server's limits) equal the local backend's; a study runs through it."""
    from adapters import make_backend
    from serve_helpers import ServerProcess

    server = ServerProcess(tiny_model_dir, tmp_path, "--max-candidates", "2", "--max-examples", "3").start()
    try:
        task = load_task(task="e2e", shots=5, seed=0)
        remote = make_backend("api", endpoint=server.url)
        local = _backend(tiny_model_dir)
        init = PromptInit("text", 3, 0, "Describe it.")
        remote.set_init(init)
        local.set_init(init)
        deltas = np.random.default_rng(3).standard_normal((3, 3, 32)).astype(np.float32) * 0.1
        got = remote.score(deltas, remote.encode(task.train, task.template, []))
        want = local.score(deltas, local.encode(task.train, task.template, []))
        assert got.logprobs.shape == (3, 5)
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)
        np.testing.assert_array_equal(got.target_tokens, want.target_tokens)
        r = cli(["optimize", "--task", "e2e", "--backend", "api", "--endpoint", server.url, "--model", tiny_model_dir,
                 "--optimizer", "cma",
                 "--budget", "4", "--popsize", "2", "--shots", "2", "--max-test", "3", "--prompt-tokens", "3",
                 "--intrinsic-dim", "4", "--storage", f"sqlite:///{tmp_path / 'a.db'}", "--runs-dir",
                 str(tmp_path / "runs"), "--no-progress", "--json"], cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["metric"] == "logprob" and "scored by likelihood only" in r.stderr
    finally:
        server.stop()


@pytest.mark.parametrize("backend", ["vllm", "openai"])
def test_backends_that_cannot_score_an_answer_refuse_generation(tmp_path, backend):
    r = cli(["optimize", "--task", "e2e", "--backend", backend, "--endpoint", "http://127.0.0.1:9",
             "--space", "projected" if backend == "vllm" else "discrete", "--storage",
             f"sqlite:///{tmp_path / 'x.db'}"], cwd=tmp_path)
    assert r.returncode == 2 and f"--backend {backend} cannot score a generation task" in r.stderr, r.stderr
    assert not (tmp_path / "x.db").exists()


def test_chat_rows_are_rendered_with_the_models_chat_template(tiny_model_dir, tmp_path):
    p = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
            for w in ("yes", "no", "maybe", "never")]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_task(data=str(p), shots=1, dev_shots=1)
    b = _backend(tiny_model_dir)
    batch = b.encode(task.train, task.template, [])
    text = b.tokenizer.decode(batch.after[0][:-len(batch.targets[0])])
    msgs = [{"role": r, "content": c} for r, c in task.train[0].chat]
    assert text == b.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert b.tokenizer.decode(batch.targets[0]) == task.train[0].targets[0] + b.tokenizer.eos_token
    assert task.kind == "generation" and len(task.test) == 2          # what the split leaves is test
