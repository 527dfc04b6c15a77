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
