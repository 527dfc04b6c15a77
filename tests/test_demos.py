"""--demos K: solved train examples before every input, and a prompt tuned from there."""

from __future__ import annotations

import json

import pytest

from bbpt.cli import main
from bbpt.config import StudyConfig
from bbpt.errors import ConfigError
from bbpt.prompt import SavedPrompt
from bbpt.session import load_task_for


def test_demos_are_train_examples_written_before_the_query_with_the_prompt_in_its_place():
    cfg = StudyConfig(task="sst2", shots=4, seed=3, demos=1, optimizer="cma")
    task, plain = load_task_for(cfg), load_task_for(StudyConfig(task="sst2", shots=4, seed=3, optimizer="cma"))
    src = task.template.source
    # one demonstration per class, each a train text followed by its label word, then the query's template
    assert src.endswith(plain.template.source) and src.count("{prompt}") == 1
    demos = src[: -len(plain.template.source)]
    shown = [ex for ex in task.train if ex.text in demos]
    assert sorted(ex.label for ex in shown) == [0, 1]
    assert all(plain.template.render_plain(ex) + task.label_words[ex.label] in demos for ex in shown)
    # the splits are the same: demonstrations change the text, not which examples are scored
    assert [e.text for e in task.test] == [e.text for e in plain.test]


def test_a_prompt_tuned_with_demos_saves_them_and_scores_the_same_in_eval(tiny_model_dir, storage_url, tmp_path,
                                                                          capsys):
    rc = main(["-q", "optimize", "--model", tiny_model_dir, "--task", "sst2", "--shots", "4", "--max-test", "16",
               "--optimizer", "cma", "--popsize", "4", "--budget", "8", "--prompt-tokens", "3", "--intrinsic-dim",
               "8", "--demos", "1", "--storage", storage_url, "--runs-dir", str(tmp_path / "runs"), "--study", "s",
               "--json", "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    saved = SavedPrompt.load(summary["prompt_path"])
    task = load_task_for(StudyConfig(task="sst2", shots=4, seed=0, demos=1, optimizer="cma", max_test=16))
    assert saved.meta["template"] == task.template.source
    assert main(["-q", "eval", "--prompt", summary["prompt_path"], "--split", "test", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(summary["test"])


def test_a_stored_config_without_demos_means_none_and_too_many_are_refused():
    old = StudyConfig(task="sst2").to_dict()
    del old["demos"]
    assert StudyConfig.from_dict(old).demos == 0
    with pytest.raises(ConfigError, match="--demos 17 is invalid.*between 0 and --shots"):
        StudyConfig(task="sst2", shots=16, demos=17)


@pytest.mark.slow
def test_on_the_default_model_demonstrations_are_kept_once_and_score_as_uncached(real_backend):
    """SST-2 with --demos 1 on SmolLM2: the shared demonstrations' keys/values give the uncached scores; and
    AG News' training set with demonstrations, whose keys/values per example went over the CPU's 1 GB cache
    (scored uncached, every call), fits with the demonstrations kept once."""
    import numpy as np

    from adapters.hf import HFBackend
    from bbpt.prompt import PromptInit

    be = real_backend
    task = load_task_for(StudyConfig(task="sst2", shots=16, seed=0, demos=1, optimizer="cma",
                                      prompt_position="infix"))
    be.set_init(PromptInit("text", 10, text=task.init_text))
    batch = be.encode(task.train[:6], task.template, task.label_words)
    d = np.random.default_rng(0).normal(scale=0.01, size=(2, 10, 576)).astype(np.float32)
    token_bytes = 30 * 2 * 3 * 64 * 4          # SmolLM2-135M: 30 layers, keys and values, 3 heads of 64, fp32
    heads, h, width = HFBackend.kv_plan(batch)
    be.kv_cache_bytes = len(heads) * (h + width) * token_bytes - 1      # whole rows do not fit; the head does
    try:
        got = be.score(d, batch).logprobs
    finally:
        be.kv_cache_bytes = 2**30
    kv = batch.kv
    assert kv.head.mask.shape[1] > 40 and kv.tail is not None
    be.reuse_kv = False
    try:
        np.testing.assert_allclose(got, be.score(d, batch).logprobs, atol=2e-3)
    finally:
        be.reuse_kv = True
    ag = load_task_for(StudyConfig(task="agnews", shots=16, seed=0, demos=1, optimizer="cma",
                                    prompt_position="infix"))
    heads, h, width = HFBackend.kv_plan(be.encode(ag.train, ag.template, ag.label_words))
    per_example = len(heads) * (h + width) * token_bytes
    kept_once = (h + len(heads) * width) * token_bytes
    assert per_example > 2**30 > kept_once
