"""What users run: the real default model (SmolLM2-135M-Instruct, from PyPI) on SST-2, through the CLI.

Slow (a few minutes on 2 CPU cores) but kept in CI: they are the proof that tuning works on a real model,
not just that the plumbing connects. The test split is capped (--max-test) to keep CI short; the full-test
numbers are in the README and in studies/results."""

import json

import pytest

from bbpt.cli import main

pytestmark = pytest.mark.slow


def optimize(tmp_path, capsys, *args) -> dict:
    rc = main(["-q", "optimize", "--task", "sst2", "--seed", "0", "--max-test", "96", "--device", "cpu",
               "--storage", f"sqlite:///{tmp_path / 'bbpt.db'}", "--runs-dir", str(tmp_path / "runs"),
               "--json", "--no-progress", *args])
    assert rc == 0
    return json.loads(capsys.readouterr().out)


def test_cma_40_calls_lowers_the_training_loss_and_eval_reproduces_it(default_model_dir, tmp_path, capsys):
    s = optimize(tmp_path, capsys, "--optimizer", "cma", "--budget", "40", "--popsize", "10")
    assert s["calls"] == 40 and s["model"] == "smollm2-135m"
    assert s["best_train_loss"] < s["start_train_loss"], s

    # the saved prompt, reloaded from disk, scores exactly what optimize reported
    assert main(["-q", "eval", "--prompt", s["prompt_path"], "--split", "test", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["examples"] == 96 and ev["accuracy"] == pytest.approx(s["test"], abs=1e-9)
    assert main(["-q", "eval", "--prompt", s["prompt_path"], "--split", "dev", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(s["dev"], abs=1e-9)

    assert main(["-q", "predict", "--prompt", s["prompt_path"], "a gorgeous, witty, seductive movie.",
                 "a dull, lifeless mess.", "--json"]) == 0
    preds = [json.loads(line)["label"] for line in capsys.readouterr().out.splitlines()]
    assert preds == ["positive", "negative"]


def test_backprop_10_steps_lowers_the_training_loss(default_model_dir, tmp_path, capsys):
    s = optimize(tmp_path, capsys, "--optimizer", "backprop", "--budget", "10")
    assert s["calls"] == 10 and s["optimizer"] == "backprop"
    assert s["best_train_loss"] < s["start_train_loss"] - 0.05, s
