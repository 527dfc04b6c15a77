"""Discrete prompt spaces on the tiny model (real tokenizer, random embeddings): z decodes to readable text, a
σ0 step changes some tokens but not all, the local backend scores text exactly, and a whole study runs."""

from __future__ import annotations

import json
import sqlite3
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from adapters.embedding_table import load_input_embeddings
from adapters.hf import label_token_ids
from bbpt.cli import main
from bbpt.discrete import READABLE, DiscreteSpace, VocabSpace, init_ids, label_vocabulary, make_text_space, read_vocab
from bbpt.errors import ConfigError
from bbpt.prompt import PromptInit, TextPrompts
from bbpt.scoring import score_prompts
from bbpt.storage import Storage
from bbpt.tasks import Template, load_task

INIT = PromptInit("text", 9, 0, "Classify the sentiment of this movie review.")


@pytest.fixture(scope="module")
def space(tiny_model_dir):
    cfg = SimpleNamespace(space="discrete", space_model=None, model=tiny_model_dir, intrinsic_dim=50, seed=0,
                          sigma0=1.0, alpha=1.0, prompt_tokens=9)
    return make_text_space(cfg, None, INIT)


def test_zero_decodes_to_the_initial_text_and_a_step_changes_some_tokens(space):
    start = space.decode(np.zeros((1, space.dim)))
    assert start.texts == (INIT.text,)
    zs = np.random.default_rng(1).standard_normal((40, space.dim))
    got = space.decode(zs)
    assert got == space.decode(zs)                                   # deterministic
    changed = np.mean([[a != b for a, b in zip(ids, start.ids[0])] for ids in got.ids])
    assert 0.05 < changed < 0.5                                      # calibrated: about a fifth at σ0
    pieces = space.tokenizer.batch_decode([[i] for ids in got.ids for i in ids if i not in start.ids[0]])
    assert pieces and all(READABLE.match(p) for p in pieces)
    with pytest.raises(ConfigError, match="no gradient"):
        space.decode_torch(torch.zeros(1, space.dim))


def test_snapping_finds_the_nearest_allowed_token(space, tiny_model_dir):
    table = load_input_embeddings(tiny_model_dir)[0].numpy()
    rows = np.random.default_rng(2).standard_normal((5, table.shape[1])).astype(np.float32) * table.std()
    got = space.snap(rows)
    dist = ((table[space.allowed][None] - rows[:, None]) ** 2).sum(-1)
    assert (got == space.allowed[dist.argmin(1)]).all()


def test_init_ids_follow_the_soft_prompt_rules(space):
    tok = space.tokenizer
    assert len(init_ids(tok, 1000, PromptInit("text", 12, 0, "good movie"))) == 12
    vocab = init_ids(tok, len(tok), PromptInit("vocab", 5, seed=3))
    assert len(set(vocab)) == 5 and vocab == init_ids(tok, len(tok), PromptInit("vocab", 5, seed=3))
    with pytest.raises(ConfigError, match="--init zeros"):
        init_ids(tok, 1000, PromptInit("zeros", 3))


def test_vocabulary_ranks_words_by_label_association():
    task = load_task(task="sst2", shots=16, seed=0)
    words = label_vocabulary(task.train, 2, 20)
    assert len(words) == 20 and words == label_vocabulary(task.train, 2, 20)
    seen = " ".join(e.text.lower() for e in task.train)
    assert all(w in seen for w in words) and "the" not in words[:10]
    vs = VocabSpace(words, 4)
    assert vs.decode(vs.initial()[None]).texts == (" ".join(words[:4]),)
    z = np.zeros(vs.dim)
    z[[0 * 20 + 7, 1 * 20 + 3, 2 * 20 + 3, 3 * 20 + 19]] = 1.0
    assert vs.decode(z).texts == (" ".join([words[7], words[3], words[3], words[19]]),)


def test_vocab_file_is_checked(tmp_path):
    (tmp_path / "v.txt").write_text("great\n\nawful\ngreat\n")
    assert read_vocab(str(tmp_path / "v.txt")) == ["great", "awful"]
    (tmp_path / "one.txt").write_text("great\n")
    with pytest.raises(ConfigError, match="at least 2"):
        read_vocab(str(tmp_path / "one.txt"))
    with pytest.raises(ConfigError, match="not a file"):
        read_vocab(str(tmp_path / "missing.txt"))


def test_local_backend_scores_text_prompts_like_a_plain_forward(tiny_backend):
    b = tiny_backend
    task = load_task(task="sst2", shots=4, seed=0)
    exs = task.train[:5]
    prompts = TextPrompts(("Classify the sentiment.", "great awful", ""))
    b.max_batch_tokens = 64          # several chunks, different padding
    got = b.score(prompts, b.encode(exs, task.template, task.label_words)).logprobs
    b.max_batch_tokens = 2048
    ids = label_token_ids(b.tokenizer, task.label_words)
    for c, text in enumerate(prompts.texts):
        for j, ex in enumerate(exs):
            x = b.tokenizer(task.template.render_text_prompt(ex, text), return_tensors="pt")
            with torch.no_grad():
                ref = torch.log_softmax(b.model(**x).logits[0, -1], -1)[ids].numpy()
            np.testing.assert_allclose(got[c, j], ref, atol=1e-5)
    assert Template("{text} {prompt}:").render_text_prompt(exs[0], "P") == exs[0].text + " P:"
    assert task.template.render_text_prompt(exs[0], "P").startswith("P\nReview: ")


def test_repeated_texts_in_a_population_are_scored_once(tiny_backend):
    seen = []

    class Counting:
        def score(self, prompts, batch):
            seen.append(len(prompts))
            return tiny_backend.score(prompts, batch)

    task = load_task(task="sst2", shots=2, seed=0)
    batch = tiny_backend.encode(task.train, task.template, task.label_words)
    prompts = TextPrompts(("a", "b", "a", "a"))
    got = score_prompts(Counting(), prompts, batch).logprobs
    assert seen == [2] and np.array_equal(got[0], got[2]) and np.array_equal(got[0], got[3])
    np.testing.assert_allclose(got[1], tiny_backend.score(TextPrompts(("b",)), batch).logprobs[0], atol=1e-6)


@pytest.mark.parametrize("space_kind,optimizer", [("discrete", "cma"), ("vocab", "nevergrad:DiscreteOnePlusOne")])
def test_a_discrete_study_saves_text_that_eval_reproduces(tiny_model_dir, storage_url, tmp_path, capsys,
                                                          space_kind, optimizer):
    rc = main(["-q", "optimize", "--model", tiny_model_dir, "--task", "sst2", "--shots", "4", "--max-test", "16",
               "--space", space_kind, "--optimizer", optimizer, "--popsize", "4", "--budget", "8",
               "--prompt-tokens", "4", "--intrinsic-dim", "8", "--vocab-size", "10", "--storage", storage_url,
               "--runs-dir", str(tmp_path / "runs"), "--study", "d", "--json", "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    text = summary["prompt_text"]
    assert (tmp_path / "runs" / "d" / "prompt.txt").read_text() == text + "\n"
    assert not (tmp_path / "runs" / "d" / "prompt.safetensors").exists()
    store = Storage(storage_url)
    trials = store.trials(store.require_study("d").id)
    assert all(isinstance(t.metrics["prompt"], str) for t in trials)
    assert main(["-q", "eval", "--prompt", summary["prompt_path"], "--split", "test", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(summary["test"])
    assert main(["studies", "show", "d", "--text", "--storage", storage_url]) == 0
    assert capsys.readouterr().out == text + "\n"
    assert main(["studies", "show", "d", "--storage", storage_url]) == 0
    assert json.loads(capsys.readouterr().out)["best_prompt"] == text
    assert main(["-q", "export", "d", "--out", str(tmp_path / "x"), "--storage", storage_url,
                 "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "discrete prompt" in capsys.readouterr().err


def test_backprop_on_a_discrete_space_is_refused(tiny_model_dir, storage_url, capsys):
    assert main(["-q", "optimize", "--model", tiny_model_dir, "--space", "discrete", "--optimizer", "backprop",
                 "--storage", storage_url]) == 2
    assert "a discrete prompt has no gradient" in capsys.readouterr().err


def test_a_database_without_the_request_cache_table_still_opens(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    store = Storage(url)
    store.create_study("s", {"optimizer": "cma"}, bbpt_version="0", model="m")
    from test_workers import as_written_before_migrations

    as_written_before_migrations(url)              # schema 1, and from before the table existed:
    con = sqlite3.connect(tmp_path / "old.db")
    con.execute("DROP TABLE request_cache")
    con.commit()
    con.close()
    Storage(url, create=False).delete_study("s")   # commands that do not write results still work on it
    Storage(url, create=False).upgrade()           # the migration to schema 2 adds the table
    store = Storage(url)
    row = store.create_study("t", {"optimizer": "cma"}, bbpt_version="0", model="m")
    cache = store.request_cache(row.id)
    cache.put_many({"k": {"top": {"a": -1.0}}})
    cache.put_many({"k": {"top": {"a": -2.0}}})   # first answer wins; no duplicate row
    assert cache.get_many(["k", "missing"]) == {"k": {"top": {"a": -1.0}}}


def test_the_summary_shows_the_prompt_text_and_the_bill():
    from bbpt.commands import format_summary

    s = dict(study="s", optimizer="cma", task="sst2", model="m", seed=0, metric="accuracy", baseline_dev=0.5,
             baseline_test=0.5, dev=0.8, test=0.7, calls=100, budget=100, tokens=1000, seconds=10.0,
             start_train_loss=0.7, best_train_loss=0.4, prompt_path="runs/s", prompt_text="Rate this review.",
             search=dict(requests=3136, cached=64, missing_labels=16), tokens_total=1200, cost=0.6,
             stopped="max_tokens_total")
    out = format_summary(s)
    assert "prompt text: 'Rate this review.'" in out and "requests 3,136, cached 64" in out
    assert "cost 0.6000" in out and "stopped early: max_tokens_total" in out
