"""bbpt's black-box recipe: what a study that names no optimizer runs (config version 5).

No --optimizer means gn with --demos auto for a soft prompt on a classification task (the arm `gn_auto_dev` of
studies/bbt_suite_v2.toml, nearer backprop than CMA-ES there), and cma wherever gn cannot read label scores. The
choice is made once, before anything is stored, and stored resolved, so a study resumes, exports and reports as
what it ran; a named optimizer runs alone, as before.
"""

from __future__ import annotations

import json

import pytest

from bbpt.cli import main
from bbpt.config import StudyConfig, resolve_recipe
from bbpt.storage import Storage


@pytest.mark.parametrize("settings, optimizer, demos", [
    (dict(task="agnews"), "gn", "auto"),                          # the recipe
    (dict(task="sst2", demos=1), "gn", 1),                         # an explicit --demos stays
    (dict(task="sst2", shots=1), "gn", 0),                         # auto needs examples left to compare on
    (dict(task="e2e"), "cma", 0),                                  # generation: no label scores for gn
    (dict(task="sst2", space="discrete"), "cma", 0),               # a text prompt's scores are steps in z
    (dict(task="agnews", depth="deep", schedule="layerwise"), "cma", 0),   # BBTv2: a CMA-ES per layer
    (dict(task="agnews", train_batches=2), "cma", 0),              # gn models every example's scores each call
    (dict(task="sst2", optimizer="cma"), "cma", 0),                # a named optimizer runs alone
    (dict(task="sst2", optimizer="backprop"), "backprop", 0),
])
def test_no_optimizer_means_gn_after_the_better_start_where_it_reads_label_scores(settings, optimizer, demos):
    cfg = resolve_recipe(StudyConfig(**settings))
    assert (cfg.optimizer, cfg.demos) == (optimizer, demos) and cfg.is_resolved
    assert resolve_recipe(cfg) is cfg


def test_gn_refuses_mini_batches_with_the_fix():
    from bbpt.errors import ConfigError

    with pytest.raises(ConfigError, match="--train-batches 2 is invalid: it must be 1 for --optimizer gn.*use cma"):
        StudyConfig(task="sst2", optimizer="gn", train_batches=2)


def test_a_data_file_is_resolved_by_its_kind(tmp_path):
    answers = tmp_path / "answers.jsonl"
    answers.write_text("\n".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) for i in range(8)))
    assert resolve_recipe(StudyConfig(task=None, data=str(answers))).optimizer == "cma"
    labelled = tmp_path / "reviews.jsonl"
    labelled.write_text("\n".join(json.dumps({"text": f"t{i}", "label": i % 2}) for i in range(8)))
    cfg = resolve_recipe(StudyConfig(task=None, data=str(labelled), template="{text}\nSentiment:",
                                     labels=[" no", " yes"]))
    assert (cfg.optimizer, cfg.demos) == ("gn", "auto")


def test_configs_stored_before_version_5_keep_cma_and_no_demonstrations():
    old = resolve_recipe(StudyConfig(task="sst2")).to_dict()
    for key in ("optimizer", "demos"):
        del old[key]
    old["version"] = 4
    cfg = StudyConfig.from_dict(old)
    assert (cfg.optimizer, cfg.demos) == ("cma", 0)


def test_bbpt_optimize_with_no_optimizer_runs_the_recipe_and_stores_it_resolved(tiny_model_dir, storage_url,
                                                                                 tmp_path, capsys):
    args = ["-q", "optimize", "--model", tiny_model_dir, "--task", "sst2", "--shots", "4", "--max-test", "8",
            "--popsize", "4", "--prompt-tokens", "3", "--intrinsic-dim", "8", "--storage", storage_url,
            "--runs-dir", str(tmp_path / "runs"), "--study", "s", "--json", "--no-progress"]
    assert main([*args, "--budget", "8"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["optimizer"] == "gn" and first["demos"] in (0, 1) and first["demos_choice_calls"] == 4
    stored = Storage(storage_url).require_study("s").config
    assert (stored["optimizer"], stored["demos"], stored["version"]) == ("gn", "auto", 6)
    assert stored["prompt_position"] == "auto" and first["placement"] in ("prefix", "infix")
    # The same command resumes it (a larger budget): the stored, resolved config is what it compares against.
    assert main([*args, "--budget", "12"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["calls"] == 12 and again["demos"] == first["demos"]
