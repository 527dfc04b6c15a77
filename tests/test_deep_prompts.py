"""Deep prompts (BBTv2's hidden-state offsets) and prefixes (PEFT's keys/values per layer) on the local backend.

The claims are the ones that make these sites correct by construction: a zero deep offset changes nothing, a
prefix made of the model's own keys/values for P0 scores exactly as P0 at the input does, the cached paths
equal the uncached one, gradients reach every tuned layer, and a prefix exported to PEFT gives PEFT's logits.
A tiny random Llama with grouped-query attention (4 heads, 2 key/value heads) and 3 layers runs them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from bbpt.errors import ConfigError
from bbpt.prompt import PromptInit, SavedPrompt
from bbpt.tasks import Example, Template

EXAMPLES = [Example("a fine film", 1), Example("dull and far too long at that", 0), Example("ok", 1)]
INIT = dict(kind="text", tokens=4, text="Classify the review")
TEMPLATES = {"prefix": "{text} It was", "infix": "Review: {text} {prompt} It was"}


@pytest.fixture(scope="module")
def three_layers(default_model_dir):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg), tok


def _backend(three_layers, reuse_kv=True):
    from adapters.hf import HFBackend

    model, tok = three_layers
    return HFBackend("tiny", model_obj=model, tokenizer=tok, device="cpu", reuse_kv=reuse_kv)


def _scores(backend, template, depth, deltas, layers="all"):
    backend.set_init(PromptInit(**INIT, depth=depth, layers=layers))
    batch = backend.encode(EXAMPLES, Template(template), [" good", " bad"])
    return backend.score(deltas, batch).logprobs


@pytest.mark.parametrize("placement", ["prefix", "infix"])
@pytest.mark.parametrize("reuse_kv", [True, False])
def test_a_zero_deep_offset_scores_exactly_as_the_input_prompt(three_layers, placement, reuse_kv):
    be = _backend(three_layers, reuse_kv)
    ref = _scores(be, TEMPLATES[placement], "input", np.zeros((2, 4, 32)))
    assert be.prompt_site().shape == (4, 32)
    deep = _scores(be, TEMPLATES[placement], "deep", np.zeros((2, 3, 4, 32)))
    assert be.prompt_site().layers == (1, 2)            # layer 0's part is the input prompt itself
    np.testing.assert_array_equal(deep, ref)


@pytest.mark.parametrize("placement", ["prefix", "infix"])
def test_deep_offsets_change_scores_and_cached_equals_uncached(three_layers, placement):
    d = np.random.default_rng(0).normal(size=(3, 3, 4, 32)) * 0.5
    cached = _scores(_backend(three_layers, True), TEMPLATES[placement], "deep", d)
    uncached = _scores(_backend(three_layers, False), TEMPLATES[placement], "deep", d)
    np.testing.assert_allclose(cached, uncached, atol=1e-5)
    only_input = d.copy()
    only_input[:, 1:] = 0
    assert np.abs(cached - _scores(_backend(three_layers), TEMPLATES[placement], "deep", only_input)).max() > 1e-3


def test_a_prefix_of_p0s_own_keys_and_values_scores_as_p0_at_the_input(three_layers):
    be = _backend(three_layers)
    ref = _scores(be, TEMPLATES["prefix"], "input", np.zeros((1, 4, 32)))
    got = _scores(be, TEMPLATES["prefix"], "prefix", np.zeros((1, 3, 2, 4, 16)))
    site = be.prompt_site()
    assert site.shape == (3, 2, 4, 16) and site.kv_heads == 2       # 2 key/value heads of 8: GQA sized
    np.testing.assert_allclose(got, ref, atol=1e-5)
    moved = _scores(be, TEMPLATES["prefix"], "prefix", np.full((1, 3, 2, 4, 16), 0.3))
    assert np.abs(moved - ref).max() > 1e-3


@pytest.mark.parametrize("depth,shape", [("deep", (3, 4, 32)), ("prefix", (3, 2, 4, 16))])
def test_gradients_reach_every_tuned_layer(three_layers, depth, shape):
    import torch

    be = _backend(three_layers)
    be.set_init(PromptInit(**INIT, depth=depth))
    batch = be.encode(EXAMPLES, Template(TEMPLATES["prefix"]), [" good", " bad"])
    delta = torch.zeros((1, *shape), requires_grad=True)
    lp, _ = be.logprobs_torch(delta, batch)
    lp[..., 0].sum().backward()
    per_block = delta.grad[0].reshape(shape[0], -1).abs().sum(-1)
    assert (per_block > 0).all(), per_block
    with torch.no_grad():
        np.testing.assert_allclose(lp.numpy(), be.score(np.zeros((1, *shape)), batch).logprobs, atol=1e-5)


def test_layer_specs_pick_layers_and_bad_ones_say_what_works():
    from adapters._deep import pick_layers

    assert pick_layers("all", 6, "deep") == (1, 2, 3, 4, 5)
    assert pick_layers("all", 6, "prefix") == (0, 1, 2, 3, 4, 5)
    assert pick_layers("every:2", 6, "prefix") == (0, 2, 4)
    assert pick_layers("last:2", 6, "deep") == (4, 5)
    assert pick_layers("first:2", 6, "deep") == (1, 2)
    assert pick_layers("3,1", 6, "prefix") == (1, 3)
    for bad in ("0", "every:x", "last:0", "9"):
        with pytest.raises(ConfigError, match="--layers"):
            pick_layers(bad, 6, "deep")


def test_deep_and_prefix_generation_runs_cached_as_uncached(three_layers):
    be = _backend(three_layers)
    for depth, shape in (("deep", (3, 4, 32)), ("prefix", (3, 2, 4, 16))):
        be.set_init(PromptInit(**INIT, depth=depth))
        d = np.random.default_rng(1).normal(size=shape) * 0.3
        tpl = Template("{text} Answer:")
        assert be.generate(d, EXAMPLES, tpl, max_new_tokens=5) == \
            be.generate(d, EXAMPLES, tpl, max_new_tokens=5, use_cache=False)


def test_settings_that_cannot_work_are_refused_before_anything_runs():
    from bbpt.config import StudyConfig
    from bbpt.session import check_flags

    with pytest.raises(ConfigError, match="--prompt-position"):
        StudyConfig(depth="prefix", prompt_position="infix")
    with pytest.raises(ConfigError, match="--prompt-position 'suffix'"):
        StudyConfig(depth="prefix", prompt_position="suffix")
    assert StudyConfig(depth="deep", prompt_position="suffix").prompt_position == "suffix"
    assert StudyConfig(depth="prefix").prompt_position == "prefix"     # auto: a prefix leads
    assert StudyConfig(depth="deep").prompt_position == "auto"         # the inputs decide when loaded
    with pytest.raises(ConfigError, match="--depth"):
        StudyConfig(depth="deep", space="discrete")
    with pytest.raises(ConfigError, match="--schedule"):
        StudyConfig(schedule="layerwise")                               # an input prompt has one block
    with pytest.raises(ConfigError, match="--backend local or api"):
        check_flags(StudyConfig(depth="deep", backend="vllm", endpoint="http://127.0.0.1:9"))
    check_flags(StudyConfig(depth="deep", backend="api", endpoint="http://127.0.0.1:9"))    # the server builds it


def test_layerwise_cma_searches_one_block_at_a_time_and_resumes():
    from bbpt.optimizers import OptimizerSettings, make_optimizer

    def settings():
        return OptimizerSettings(dim=6, x0=np.zeros(6), seed=0, budget=40, popsize=4, blocks=[(0, 2), (2, 6)])

    opt = make_optimizer("cma", settings())
    first = opt.ask()
    assert np.all(first[:, 2:] == 0) and np.any(first[:, :2] != 0)     # block 0's turn: the rest stays put
    opt.tell(first, (first ** 2).sum(1))
    second = opt.ask()
    np.testing.assert_array_equal(second[:, :2], np.tile(opt.current[:2], (4, 1)))
    assert np.any(second[:, 2:] != 0)
    opt.tell(second, (second ** 2).sum(1))
    again = make_optimizer("cma", settings())
    again.load_state(opt.state())
    np.testing.assert_array_equal(again.ask(), opt.ask())


@pytest.mark.parametrize("depth,optimizer,extra", [
    ("deep", "cma", ["--schedule", "layerwise", "--budget", "8", "--popsize", "4"]),
    ("prefix", "backprop", ["--budget", "3"]),
])
def test_a_deep_or_prefix_study_saves_a_prompt_that_eval_scores_the_same(tiny_model_dir, tmp_path, depth,
                                                                          optimizer, extra):
    from tests.study_helpers import cli, optimize_args

    url = f"sqlite:///{tmp_path}/s.db"
    args = optimize_args(tiny_model_dir, url, "deep", optimizer=optimizer, runs_dir=tmp_path / "runs")
    res = cli(args + ["--depth", depth] + extra, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    saved = SavedPrompt.load(summary["prompt_path"])
    assert saved.depth == depth and saved.meta["scales"] and saved.layers
    res = cli(["eval", "--prompt", summary["prompt_path"], "--split", "test", "--device", "cpu", "--json"],
              cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["accuracy"] == pytest.approx(summary["test"])


def test_a_layerwise_budget_below_one_sweep_is_refused_and_writes_nothing(tiny_model_dir, tmp_path):
    from tests.study_helpers import cli, optimize_args

    url = f"sqlite:///{tmp_path}/s.db"
    res = cli(optimize_args(tiny_model_dir, url, "short", budget=4, runs_dir=tmp_path / "runs")
              + ["--depth", "deep", "--schedule", "layerwise"], cwd=tmp_path)
    assert res.returncode == 2
    assert "one sweep takes 8 calls" in res.stderr and "--budget 4" in res.stderr
    assert not (tmp_path / "s.db").exists()


def test_a_prefix_exports_to_peft_and_gives_peft_s_logits(tiny_model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters.hf import HFBackend
    from bbpt.export import from_peft, to_peft

    be = HFBackend(tiny_model_dir, device="cpu")
    be.set_init(PromptInit(**INIT, depth="prefix"))
    delta = np.random.default_rng(0).normal(size=be.prompt_site().shape).astype(np.float32) * 0.5
    meta = dict(model=tiny_model_dir, template="{text} It was", label_words=[" good", " bad"], tokens=4,
                **be.prompt_site().describe())
    saved = SavedPrompt(be.prompt_matrix(delta), meta, layers=be.prompt_layers(delta))
    saved.save(tmp_path / "bbpt")
    out = to_peft(SavedPrompt.load(tmp_path / "bbpt"), tmp_path / "peft")
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"

    ours = be.score(delta[None], be.encode(EXAMPLES, Template("{text} It was"), [" good", " bad"])).logprobs[0]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out)).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = [tok(w, add_special_tokens=False)["input_ids"][0] for w in (" good", " bad")]
    with torch.no_grad():
        theirs = np.array([torch.log_softmax(model(**tok(f"{ex.text} It was", return_tensors="pt")).logits[0, -1]
                                             .float(), -1)[ids].numpy() for ex in EXAMPLES])
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    back = SavedPrompt.load(from_peft(out, tmp_path / "back"))
    np.testing.assert_allclose(back.layers["prefix"], saved.layers["prefix"])
    assert back.depth == "prefix"


def test_a_saved_deep_prompt_in_a_serve_bank_scores_as_it_was_tuned(three_layers, tmp_path):
    from bbpt.server.prompts import entry_from_saved

    be = _backend(three_layers)
    be.set_init(PromptInit(**INIT, depth="deep", layers="2"))
    delta = np.random.default_rng(2).normal(size=be.prompt_site().shape).astype(np.float32) * 0.3
    batch = be.encode(EXAMPLES, Template(TEMPLATES["prefix"]), [" good", " bad"])
    tuned = be.score(delta[None], batch).logprobs
    meta = dict(template=TEMPLATES["prefix"], label_words=[" good", " bad"], task="sst2", tokens=4,
                prompt_is="P0 + delta", **be.prompt_site().describe())
    SavedPrompt(be.prompt_matrix(delta), meta, layers=be.prompt_layers(delta)).save(tmp_path / "p")
    entry = entry_from_saved("p", SavedPrompt.load(tmp_path / "p"))
    be.set_init(entry.init)
    assert be.prompt_site().layers == (2,)
    np.testing.assert_allclose(be.score(entry.delta, batch).logprobs, tuned, atol=1e-5)


@pytest.mark.slow
def test_on_the_default_model_deep_and_prefix_start_exactly_where_the_input_prompt_is(real_backend):
    """SmolLM2-135M (30 layers, 3 key/value heads of 64): the untuned deep prompt and the prefix of P0's own
    keys/values score SST-2 as P0 at the input does, and deep offsets move the scores."""
    from bbpt.tasks import load_task

    task = load_task(task="sst2", shots=4, seed=0, prompt_position="prefix")
    batch = real_backend.encode(task.train, task.template, task.label_words)
    scores = {}
    for depth in ("input", "deep", "prefix"):
        real_backend.set_init(PromptInit("text", 10, text=task.init_text, depth=depth))
        shape = real_backend.prompt_site().shape
        scores[depth] = real_backend.score(np.zeros((1, *shape)), batch).logprobs
        if depth == "deep":
            assert shape == (30, 10, 576) and real_backend.prompt_site().layers == tuple(range(1, 30))
            moved = real_backend.score(np.full((1, *shape), 0.05, np.float32), batch).logprobs
            assert np.abs(moved - scores["input"]).max() > 1e-2
        if depth == "prefix":
            assert shape == (30, 2, 10, 192) and real_backend.prompt_site().kv_heads == 3
    real_backend.set_init(PromptInit("text", 10, text=task.init_text))
    np.testing.assert_array_equal(scores["deep"], scores["input"])
    np.testing.assert_allclose(scores["prefix"], scores["input"], atol=2e-4)


@pytest.mark.slow
def test_a_prefix_tuned_on_the_default_model_exports_to_peft_with_peft_s_logits(tmp_path):
    """What a user runs: `bbpt optimize --depth prefix --optimizer backprop`, `bbpt export --format peft`, and
    PEFT's own loading gives the label scores bbpt gives."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters.hf import HFBackend
    from bbpt.cli import main
    from bbpt.config import StudyConfig
    from bbpt.session import load_task_for

    url = f"sqlite:///{tmp_path / 'bbpt.db'}"
    assert main(["optimize", "--depth", "prefix", "--optimizer", "backprop", "--budget", "2", "--shots", "4",
                 "--max-test", "8", "--prompt-tokens", "4", "--device", "cpu", "--study", "real", "--storage", url,
                 "--runs-dir", str(tmp_path / "runs"), "--no-progress"]) == 0
    assert main(["export", "real", "--format", "peft", "--out", str(tmp_path / "peft"), "--storage", url,
                 "--runs-dir", str(tmp_path / "runs")]) == 0
    saved = SavedPrompt.load(tmp_path / "runs" / "real")
    task = load_task_for(StudyConfig.from_dict(saved.meta["config"]))
    be = HFBackend(saved.meta["model"], device="cpu")
    init, delta = saved.scoring_init()
    be.set_init(init)
    ours = be.score(delta[None], be.encode(task.test, task.template, task.label_words)).logprobs[0]
    base = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(tmp_path / "peft")).eval()
    tok = AutoTokenizer.from_pretrained(base)
    ids = [tok(w, add_special_tokens=False)["input_ids"][0] for w in task.label_words]
    with torch.no_grad():
        theirs = np.array([torch.log_softmax(model(**tok(task.template.render(ex)[1], return_tensors="pt"))
                                             .logits[0, -1].float(), -1)[ids].numpy() for ex in task.test])
    np.testing.assert_allclose(theirs, ours, atol=2e-4)
