"""Black-box scoring that reuses keys/values must give the scores of whole-sequence forwards, in every placement,
batched or not, and must not hold more memory after many calls than after a few."""

import json
import logging

import numpy as np
import pytest
import torch

import adapters.hf as hf
from bbpt.cli import main
from bbpt.errors import ConfigError
from bbpt.prompt import PromptInit
from bbpt.tasks import Example, Template, load_task

TEXTS = ["a gorgeous, witty, seductive movie.", "dull", "the plot meanders for two long hours and never lands",
         "fine", "an utter waste of a fine cast and of my evening", "the best thing this year, by far"]
LABELS = [" negative", " positive"]
TEMPLATES = {
    "prefix": "Review: {text}\nSentiment:",
    "prefix after shared text": "Classify.{prompt} Review: {text}\nSentiment:",
    "infix": "Review: {text}\n{prompt}Sentiment:",
    "infix, pair after the prompt": "A: {text}\n{prompt}B: {text_pair}\nSame?:",
    "suffix": "Review: {text}\nSentiment:{prompt}",
    # demonstrations (``--demos``): a long run of tokens every example starts with, kept once (SharedKV)
    "infix after demonstrations": "Review: a gorgeous and witty film, the best of its year by a long way\n"
                                  "Sentiment: positive\n\nReview: dull, overlong and badly acted; it wastes "
                                  "a fine cast\nSentiment: negative\n\nReview: {text}\n{prompt}Sentiment:",
}
DEMOS = TEMPLATES["infix after demonstrations"]


def examples():
    return [Example(t, i % 2, TEXTS[-1 - i]) for i, t in enumerate(TEXTS)]


@pytest.fixture
def backend(tiny_model_dir):
    return hf.HFBackend(tiny_model_dir, device="cpu")


def deltas(b, pop=4, m=3, seed=0):
    return np.random.default_rng(seed).normal(scale=0.05, size=(pop, m, b.info().hidden_size)).astype(np.float32)


def uncached(b, d, batch):
    b.reuse_kv = False
    try:
        return b.score(d, batch).logprobs
    finally:
        b.reuse_kv = True


def test_reused_caches_go_by_the_installed_transformers_name(backend):
    # transformers 5.24 renamed the forward's past_key_values to cache (the old name goes in 5.40): the
    # cached path must use the name the installed version takes, so it warns nothing and keeps working.
    import warnings

    b = backend
    b.set_init(PromptInit("vocab", 3, seed=2))
    batch = b.encode(examples(), Template(TEMPLATES["infix"]), LABELS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b.score(deltas(b), batch)
        b.score(deltas(b), batch)        # continued from stored keys/values
    assert b.reuse_kv
    assert not [str(w.message) for w in caught if "past_key_values" in str(w.message)]


@pytest.mark.parametrize("name", TEMPLATES)
def test_cached_scores_equal_whole_sequence_forwards(backend, name):
    b = backend
    b.set_init(PromptInit("vocab", 3, seed=2))
    batch = b.encode(examples(), Template(TEMPLATES[name]), LABELS)
    d = deltas(b)
    ref = uncached(b, d, batch)
    b.max_batch_tokens = 48          # several forwards, each with padding in its past and its new tokens
    first = b.score(d, batch)
    again = b.score(d, batch)        # the second call reuses what the first one kept
    np.testing.assert_allclose(first.logprobs, ref, atol=1e-4)
    np.testing.assert_allclose(again.logprobs, ref, atol=1e-4)
    assert first.tokens == b.score(d[:1], batch).tokens * len(d)


def test_infix_matches_a_plain_unpadded_forward(backend):
    """An independent reference: the model on one example's full embedding sequence, nothing batched."""
    b = backend
    b.set_init(PromptInit("text", 3, text="good bad"))
    tmpl = Template(TEMPLATES["infix"])
    d = deltas(b, pop=2)
    got = b.score(d, b.encode(examples(), tmpl, LABELS)).logprobs
    ids = hf.label_token_ids(b.tokenizer, LABELS)
    emb = b.embedding
    for j, ex in enumerate(examples()):
        before, after = tmpl.render(ex)
        for c in range(2):
            p = b.p0 + torch.from_numpy(d[c])
            x = torch.cat([emb(torch.tensor(b.tokenizer(before)["input_ids"])), p,
                           emb(torch.tensor(b.tokenizer(after, add_special_tokens=False)["input_ids"]))])
            with torch.no_grad():
                ref = torch.log_softmax(b.model(inputs_embeds=x[None]).logits[0, -1], -1)[ids].numpy()
            np.testing.assert_allclose(got[c, j], ref, atol=1e-4)


@pytest.mark.parametrize("name", ["prefix", "infix", "suffix"])
def test_population_in_one_call_equals_one_candidate_at_a_time(backend, name):
    b = backend
    b.set_init(PromptInit("vocab", 3, seed=1))
    batch = b.encode(examples(), Template(TEMPLATES[name]), LABELS)
    d = deltas(b, pop=5)
    together = b.score(d, batch).logprobs
    for c in range(5):
        np.testing.assert_allclose(together[c], b.score(d[c:c + 1], batch).logprobs[0], atol=1e-5)


def test_each_placement_computes_only_what_changed(backend):
    b = backend
    b.set_init(PromptInit("zeros", 3))
    exs, pop, m = examples(), 4, 3
    for name in ("prefix", "infix", "suffix"):
        batch = b.encode(exs, Template(TEMPLATES[name]), LABELS)
        b.score(deltas(b, pop), batch)                  # builds whatever is kept
        before = dict(b.stats)
        b.score(deltas(b, pop, seed=1), batch)
        computed = b.stats["computed_tokens"] - before["computed_tokens"]
        if name == "prefix":        # the prompt once per candidate, then each example's own tokens
            assert computed == pop * m + pop * sum(len(a) for a in batch.after)
        else:                       # only the prompt and the cue: each input was encoded on the first call
            assert computed == pop * sum(m + len(a) for a in batch.after)
        if name == "suffix":        # the cue too: only the prompt's own tokens are computed again
            assert computed == pop * m * len(exs)
        assert computed < b.score(deltas(b, pop), batch).tokens


def test_memory_is_flat_over_many_calls(backend):
    b = backend
    b.set_init(PromptInit("vocab", 3))
    batch = b.encode(examples(), Template(TEMPLATES["infix"]), LABELS)
    d = deltas(b)
    b.score(d, batch)
    kept, kv = dict(b._kv_kept), batch.kv
    rss0 = _rss_mb()
    for i in range(150):
        b.score(deltas(b, seed=i), batch)
    assert batch.kv is kv and b._kv_kept.keys() == kept.keys()
    assert _rss_mb() - rss0 < 20


def test_kept_caches_stay_within_the_budget_and_dead_batches_leave(backend):
    b = backend
    b.set_init(PromptInit("vocab", 3))
    tmpl = Template(TEMPLATES["infix"])
    d = deltas(b, pop=2)
    first = b.encode(examples()[:3], tmpl, LABELS)
    b.score(d, first)
    one = first.kv.nbytes
    b.kv_cache_bytes = int(one * 1.5)                   # room for one such batch, not two
    second = b.encode(examples()[3:], tmpl, LABELS)
    np.testing.assert_allclose(b.score(d, second).logprobs, uncached(b, d, second), atol=1e-4)
    assert first.kv is None and second.kv is not None
    assert sum(n for _, n in b._kv_kept.values()) <= b.kv_cache_bytes
    del second
    assert not b._kv_kept
    b.kv_cache_bytes = 1                                # too big to keep at all: nothing kept, same scores
    np.testing.assert_allclose(b.score(d, first).logprobs, uncached(b, d, first), atol=1e-4)
    assert first.kv is None and not b._kv_kept


@pytest.mark.parametrize("name", ["infix", "infix, pair after the prompt", "infix after demonstrations"])
def test_a_population_on_a_batch_too_big_to_keep_encodes_each_input_once_and_keeps_no_more(backend, name):
    b = backend
    b.set_init(PromptInit("vocab", 3))
    batch = b.encode(examples(), Template(TEMPLATES[name]), LABELS)
    b.score(deltas(b, pop=1), batch)                    # learns the bytes a token's keys/values take
    h = hf.common_head(batch.before) if name == "infix after demonstrations" else 0
    width = max(len(x) for x in batch.before) - h
    batch.kv, b._kv_kept = None, type(b._kv_kept)()
    # Not all six inputs' own keys/values (after the demonstrations' head, which is kept): a group at a time.
    b.kv_cache_bytes = (h + 5 * width) * b._kv_token_bytes
    pop, m = 5, 3
    d = deltas(b, pop=pop, m=m)
    before = dict(b.stats)
    got = b.score(d, batch).logprobs
    computed = b.stats["computed_tokens"] - before["computed_tokens"]
    # Each input's text before the prompt once (not once per candidate), then the prompt and the text after.
    assert computed == h + sum(len(x) - h for x in batch.before) + pop * sum(m + len(a) for a in batch.after)
    assert batch.kv is None if not h else (batch.kv.tail is None and batch.kv.head_len == h)
    np.testing.assert_allclose(got, uncached(b, d, batch), atol=1e-4)


def test_models_whose_cache_cannot_be_reused_are_scored_uncached(backend, monkeypatch, caplog):
    monkeypatch.setattr(hf, "reuse_works", lambda *a: ("no cache here", 0))
    b = backend
    b.set_init(PromptInit("vocab", 3))
    batch = b.encode(examples(), Template(TEMPLATES["infix"]), LABELS)
    with caplog.at_level(logging.WARNING):
        got = b.score(deltas(b), batch).logprobs
    assert "no cache here" in caplog.text and batch.kv is None
    np.testing.assert_allclose(got, uncached(b, deltas(b), batch), atol=1e-6)


def test_gradients_still_flow_with_an_infix_prompt(backend):
    b = backend
    b.set_init(PromptInit("vocab", 3))
    batch = b.encode(examples(), Template(TEMPLATES["infix"]), LABELS)
    cached = b.score(deltas(b, pop=2), batch).logprobs      # leaves keys/values on the batch
    d = torch.from_numpy(deltas(b, pop=2)).requires_grad_(True)
    lp, _ = b.logprobs_torch(d, batch)
    lp[..., 0].sum().backward()
    assert d.grad is not None and d.grad.abs().sum() > 0
    np.testing.assert_allclose(lp.detach().numpy(), cached, atol=1e-4)


def test_forwards_are_planned_to_pad_little_within_the_token_budget():
    lens = sorted(np.random.default_rng(0).integers(5, 60, 640).tolist())
    past = np.random.default_rng(1).integers(0, 80, 640).tolist()
    cuts = hf.plan_chunks(lens, 2048, past)
    assert [s for s, _ in cuts] == [0] + [e for _, e in cuts[:-1]] and cuts[-1][1] == len(lens)
    for s, e in cuts:
        assert (e - s) * lens[e - 1] <= 2048 and (e - s) * (lens[e - 1] + max(past[s:e])) <= 4 * 2048
    assert sum((e - s) * lens[e - 1] for s, e in cuts) < 1.05 * sum(lens)
    assert hf.plan_chunks([5000, 6000], 2048) == [(0, 1), (1, 2)]      # too long for the budget: alone


def test_template_moves_the_prompt_to_a_position():
    assert Template("Review: {text}\nSentiment:").at("infix").source == "Review: {text}\n{prompt}Sentiment:"
    pair = Template("P: {text}\nH: {text_pair}\nSame?:")
    assert pair.at("infix").source == "P: {text}\nH: {text_pair}\n{prompt}Same?:"
    assert Template("Review: {text}\nSentiment:").at("prefix").placement == "prefix"
    assert Template("{text} {prompt}Cue:").at("infix").source == "{text} {prompt}Cue:"
    with pytest.raises(ConfigError, match="infix position but --prompt-position is prefix"):
        Template("{text} {prompt}Cue:").at("prefix")
    with pytest.raises(ConfigError, match="unknown --prompt-position 'middle'"):
        Template("{text}").at("middle")
    task = load_task(task="sst2", shots=2, prompt_position="infix")
    assert task.template.source.endswith("\n{prompt}Sentiment (positive or negative):")
    suffix = Template("Review: {text}\nSentiment:").at("suffix")
    assert suffix.source == "Review: {text}\nSentiment:{prompt}" and suffix.placement == "suffix"
    assert suffix.render(Example("dull")) == ("Review: dull\nSentiment:", "")
    assert Template("{text} Cue: {prompt} ").placement == "suffix"       # whitespace after it is no cue
    with pytest.raises(ConfigError, match="suffix position but --prompt-position is infix"):
        Template("{text} Cue:{prompt}").at("infix")


def test_optimize_with_an_infix_prompt_saves_its_template(tiny_model_dir, storage_url, tmp_path, capsys):
    rc = main(["-q", "optimize", "--model", tiny_model_dir, "--task", "sst2", "--shots", "4", "--max-test", "8",
               "--prompt-position", "infix", "--popsize", "4", "--budget", "8", "--prompt-tokens", "3",
               "--intrinsic-dim", "8", "--storage", storage_url, "--runs-dir", str(tmp_path), "--json",
               "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    meta = json.loads((tmp_path / summary["study"] / "prompt.json").read_text())
    assert Template(meta["template"]).placement == "infix" and meta["config"]["prompt_position"] == "infix"
    assert main(["-q", "eval", "--prompt", summary["prompt_path"], "--split", "test", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(summary["test"])


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        import os

        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_out_of_device_memory_retries_in_smaller_forwards_with_the_same_scores(backend, monkeypatch, caplog):
    # A GPU shared by several study workers runs out of memory mid-study (seen with 12 on one H200). The
    # backend must shrink its forwards and carry on, not kill the worker: here "memory" is any forward of more
    # than 64 tokens (the input's keys/values kept across calls are recomputed, in smaller forwards).
    from bbpt.errors import BackendError

    b = backend
    b.set_init(PromptInit("vocab", 3, seed=2))
    batch = b.encode(examples(), Template(TEMPLATES["infix"]), LABELS)
    d = deltas(b)
    ref = uncached(b, d, batch)
    forward = b.model.forward

    def small_memory(*args, limit=64, **kw):
        x = kw.get("inputs_embeds", kw.get("input_ids"))
        if x is not None and x.shape[0] * x.shape[1] > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 46.00 MiB.")
        return forward(*args, **kw)

    b.close()
    b.max_batch_tokens = 2048
    monkeypatch.setattr(hf, "MIN_BATCH_TOKENS", 16)      # the tiny examples' forwards are far below 256 tokens
    monkeypatch.setattr(b.model, "forward", small_memory)
    with caplog.at_level(logging.WARNING, logger="adapters.hf"):
        got = b.score(d, batch)
    np.testing.assert_allclose(got.logprobs, ref, atol=1e-4)
    assert 16 <= b.max_batch_tokens <= 64 and "out of memory" in caplog.text
    monkeypatch.setattr(b.model, "forward", lambda *a, **kw: small_memory(*a, limit=0, **kw))
    with pytest.raises(BackendError, match="fewer study --workers"):
        b.score(d, batch)


def test_demonstrations_every_example_starts_with_are_encoded_and_kept_once(backend):
    b = backend
    b.set_init(PromptInit("vocab", 3))
    batch = b.encode(examples(), Template(DEMOS), LABELS)
    h = hf.common_head(batch.before)
    assert h >= hf.SHARED_HEAD_MIN and all(len(x) > h for x in batch.before)
    b.score(deltas(b), b.encode(examples()[:1], Template(DEMOS), LABELS))      # learns a token's bytes
    width = max(len(x) for x in batch.before)
    b.kv_cache_bytes = len(TEXTS) * width * b._kv_token_bytes - 1            # whole rows do not fit
    d = deltas(b)
    before = dict(b.stats)
    got = b.score(d, batch).logprobs
    built = b.stats["computed_tokens"] - before["computed_tokens"] - len(d) * sum(3 + len(a) for a in batch.after)
    np.testing.assert_allclose(got, uncached(b, d, batch), atol=1e-4)
    kv = batch.kv
    assert isinstance(kv, hf.SharedKV) and kv.head.mask.shape == (1, h) and kv.tail.mask.shape[0] == len(TEXTS)
    assert built == h + sum(len(x) - h for x in batch.before)          # the head once, then each example's own
    assert kv.nbytes < len(TEXTS) * width * b._kv_token_bytes / 2      # not the head once per example


def test_when_only_the_shared_head_fits_each_example_runs_its_own_tokens_after_it(backend, caplog):
    b = backend
    b.set_init(PromptInit("vocab", 3))
    batch = b.encode(examples(), Template(DEMOS), LABELS)
    h = hf.common_head(batch.before)
    b.score(deltas(b), b.encode(examples()[:1], Template(DEMOS), LABELS))      # learns a token's bytes
    b.kv_cache_bytes = (h + 2) * b._kv_token_bytes                         # the head, not the examples' own
    d = deltas(b)
    with caplog.at_level(logging.INFO, logger="adapters.hf"):
        got = b.score(d, batch).logprobs
    assert "keeping only the" in caplog.text and batch.kv.tail is None
    np.testing.assert_allclose(got, uncached(b, d, batch), atol=1e-4)
    before = dict(b.stats)
    b.score(d[:1], batch)           # one prompt (a population encodes each input's own text once for all)
    own = sum(len(x) - h + 3 + len(a) for x, a in zip(batch.before, batch.after))
    assert b.stats["computed_tokens"] - before["computed_tokens"] == own


def test_a_deep_prompt_after_demonstrations_scores_cached_as_uncached(backend):
    b = backend
    b.set_init(PromptInit("vocab", 3, depth="deep"))
    d = np.random.default_rng(0).normal(scale=0.3, size=(2, *b.prompt_site().shape)).astype(np.float32)
    batch = b.encode(examples(), Template(DEMOS), LABELS)
    ref = uncached(b, d, batch)
    np.testing.assert_allclose(b.score(d, batch).logprobs, ref, atol=1e-4)
    assert isinstance(batch.kv, hf.KV)                                  # whole rows, as they fit
    b.kv_cache_bytes = batch.kv.nbytes - 1                              # they do not: the head and each tail
    batch = b.encode(examples(), Template(DEMOS), LABELS)
    np.testing.assert_allclose(b.score(d, batch).logprobs, ref, atol=1e-4)
    assert batch.kv.tail is not None
    b.kv_cache_bytes = (hf.common_head(batch.before) + 2) * b._kv_token_bytes      # the shared head alone
    batch = b.encode(examples(), Template(DEMOS), LABELS)
    np.testing.assert_allclose(b.score(d, batch).logprobs, ref, atol=1e-4)
    assert batch.kv.tail is None


def test_no_prompt_after_demonstrations_reuses_the_kept_head_and_scores_as_uncached(backend):
    # The manual baseline (no prompt) of a study with --demos: scored uncached, each example ran the whole run
    # of demonstrations again (DBpedia's test set, ~1,650 tokens an example, was most of such a study's wall time).
    b = backend
    b.set_init(PromptInit("vocab", 3))
    batch = b.encode(examples(), Template(DEMOS), LABELS)
    h = hf.common_head(batch.before)
    ref = uncached(b, None, batch)
    b.score(deltas(b), b.encode(examples()[:1], Template(DEMOS), LABELS))      # learns a token's bytes
    b.kv_cache_bytes = (h + 2) * b._kv_token_bytes                         # the head, not the examples' own
    np.testing.assert_allclose(b.score(None, batch).logprobs, ref, atol=1e-4)
    assert batch.kv.tail is None
    before = dict(b.stats)
    result = b.score(None, batch)
    own = sum(len(x) - h + len(a) for x, a in zip(batch.before, batch.after))
    assert b.stats["computed_tokens"] - before["computed_tokens"] == own
    assert result.tokens == sum(len(x) + len(a) for x, a in zip(batch.before, batch.after))   # billed whole
    b.kv_cache_bytes = 10**10                                             # whole rows: only the text after
    batch = b.encode(examples(), Template(DEMOS), LABELS)
    np.testing.assert_allclose(b.score(None, batch).logprobs, ref, atol=1e-4)
    before = dict(b.stats)
    b.score(None, batch)
    assert b.stats["computed_tokens"] - before["computed_tokens"] == sum(len(a) for a in batch.after)


@pytest.mark.parametrize("depth", ["input", "deep"])
@pytest.mark.parametrize("kept", ["whole rows", "head and tails", "head alone"])
def test_candidates_sharing_a_past_run_packed_in_one_row_with_the_scores_of_a_row_each(backend, kept, depth):
    # forward_slots: a row per example holding all its candidates (or, after a shared head alone, many
    # examples' segments in one row), each segment masked from the others, positions continuing its past.
    # A deep prompt's offsets must land on each segment's own prompt: packed, its scores are a row's each.
    b = backend
    b.set_init(PromptInit("vocab", 3, depth=depth))
    shape = b.prompt_site().shape
    first = b.encode(examples()[:1], Template(DEMOS), LABELS)
    b.score(np.zeros((1, *shape), np.float32), first)                      # learns a token's bytes
    batch = b.encode(examples(), Template(DEMOS), LABELS)
    h, width = hf.common_head(batch.before), max(len(x) for x in batch.before)
    b.kv_cache_bytes = {"whole rows": 10**10, "head and tails": len(TEXTS) * width * b._kv_token_bytes - 1,
                        "head alone": (h + 2) * b._kv_token_bytes}[kept]
    d = np.random.default_rng(0).normal(scale=0.3, size=(5, *shape)).astype(np.float32)
    b.pack = False
    ref = b.score(d, batch).logprobs
    rows_each = b.stats["forwards"]
    b.pack = True
    before = dict(b.stats)
    got = b.score(d, batch).logprobs
    np.testing.assert_allclose(got, ref, atol=1e-4)
    np.testing.assert_allclose(got, uncached(b, d, batch), atol=1e-4)
    assert b._slots_checked == ""
    assert b.stats["forwards"] - before["forwards"] <= rows_each


def test_a_model_that_cannot_score_packed_segments_scores_a_row_each(backend, monkeypatch, caplog):
    b = backend
    b.set_init(PromptInit("vocab", 3))
    batch = b.encode(examples(), Template(TEMPLATES["infix"]), LABELS)
    d = deltas(b)
    monkeypatch.setattr(hf, "slots_work", lambda *a: "packed and separate scores differ by 1.00e+00")
    with caplog.at_level(logging.WARNING, logger="adapters.hf"):
        got = b.score(d, batch).logprobs
    assert "cannot score packed segments" in caplog.text and b._slots_checked
    np.testing.assert_allclose(got, uncached(b, d, batch), atol=1e-4)
