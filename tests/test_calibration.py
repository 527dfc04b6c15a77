"""Label calibration (``--calibration bias``): a per-class bias fitted on the training scores only, searched
for with every candidate, saved with the prompt and applied by eval, predict, the server's bank and export."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bbpt import objective
from bbpt.config import StudyConfig
from bbpt.errors import ConfigError, ObjectiveError
from bbpt.prompt import FullSpace, PromptInit, SavedPrompt
from bbpt.scoring import score_population
from bbpt.storage import Storage
from study_helpers import cli, optimize_args


def _skewed(seed=0, pop=3, n=60, c=4):
    """Scores whose argmax is one class most of the time, though the labels are balanced."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % c
    lp = rng.normal(size=(pop, n, c)) + 2.0 * np.eye(c)[y] * 0.5
    lp[..., 1] += 3.0
    return lp, y


def test_the_fitted_bias_is_the_minimiser_and_undoes_a_label_prior():
    lp, y = _skewed()
    b = objective.fit_bias(lp, y)
    z = lp + b[:, None, :]
    p = np.exp(z - np.logaddexp.reduce(z, -1, keepdims=True))
    grad = (p - np.eye(4)[y]).mean(1) + objective.BIAS_RIDGE * b
    assert np.abs(grad).max() < 1e-8                      # stationary point of a strictly convex problem
    assert (objective.loss(z, y) < objective.loss(lp, y)).all()
    raw = (lp.argmax(-1) == y).mean(-1)
    assert (raw < 0.5).all() and ((z.argmax(-1) == y).mean(-1) > raw + 0.2).all()
    assert np.allclose(objective.fit_bias(lp + 5.0, y), b, atol=1e-6)   # a constant shift changes nothing


def test_a_non_finite_score_is_refused_before_fitting():
    lp, y = _skewed()
    lp[1, 3, 2] = np.nan
    with pytest.raises(ObjectiveError, match=r"candidate\(s\) \[1\]"):
        objective.fit_bias(lp, y)


def test_backprop_through_a_calibrated_loss_gets_the_true_gradient(tiny_backend):
    """The bias is refitted for every prompt; by the envelope theorem the gradient at the fitted bias, held
    fixed, is the gradient of the calibrated loss. Checked against central differences that refit it."""
    from bbpt.tasks import load_task

    task = load_task(task="agnews", shots=2, seed=0)
    batch = tiny_backend.encode(task.train, task.template, task.label_words)
    y = np.array([e.label for e in task.train])
    tiny_backend.set_init(PromptInit("vocab", 2, 0))
    space = FullSpace(2, tiny_backend.info().hidden_size)
    rng = np.random.default_rng(0)
    z, u = rng.normal(size=(1, space.dim)) * 0.5, rng.normal(size=space.dim)
    got = score_population(tiny_backend, space, z, batch, y, "ce", True, "bias")
    g = got.grads[0]
    # The random model's loss is nearly flat: a direction half along the gradient keeps the difference above
    # float32 noise, half at random keeps the check from being one of magnitude only.
    v = g / np.linalg.norm(g) + u / np.linalg.norm(u)
    v /= np.linalg.norm(v)
    eps = 0.1
    plus, minus = (score_population(tiny_backend, space, z + s * eps * v, batch, y, "ce", False, "bias").losses[0]
                   for s in (1, -1))
    numeric = (plus - minus) / (2 * eps)
    assert g @ v == pytest.approx(numeric, rel=2e-2)
    uncalibrated = score_population(tiny_backend, space, z, batch, y, "ce", True, "none")
    assert uncalibrated.grads[0] @ v != pytest.approx(numeric, rel=0.2)    # the bias does change the gradient
    assert got.losses[0] < uncalibrated.losses[0] and got.biases.shape == (1, 4)


def test_a_study_fits_on_train_only_and_saves_what_eval_applies(tmp_path, tiny_model_dir, monkeypatch):
    """In process, with fit_bias spied on: every fit sees the training labels and nothing else; the selected
    trial's bias is the saved prompt's, and `bbpt eval` on test reproduces the stored test score with it."""
    from bbpt.cli import main
    from bbpt.tasks import load_task

    seen = []
    real = objective.fit_bias
    monkeypatch.setattr(objective, "fit_bias", lambda lp, y, **kw: seen.append(np.asarray(y).copy()) or real(lp, y))
    url = f"sqlite:///{tmp_path / 'cal.db'}"
    assert main(optimize_args(tiny_model_dir, url, "cal", budget=16, runs_dir=tmp_path / "runs",
                              extra=("--task", "agnews"))) == 0
    task = load_task(task="agnews", shots=4, seed=0)
    y_train = [e.label for e in task.train]
    assert seen and all(list(y) == y_train for y in seen)
    storage = Storage(url)
    row = storage.require_study("cal")
    sel = row.summary["selected_trial"]
    trial = storage.trial(row.id, sel)
    saved = SavedPrompt.load(tmp_path / "runs" / "cal")
    assert saved.meta["calibration"]["fitted_on"] == "train"
    assert saved.bias.tolist() == pytest.approx(trial.metrics["bias"], abs=1e-6)
    manual = [e for e in storage.evaluations(row.id) if e.trial_number is None]
    assert all(len(e.metrics["bias"]) == 4 for e in manual)     # the baseline is calibrated too
    done = cli(["eval", "--prompt", str(tmp_path / "runs" / "cal"), "--split", "test", "--device", "cpu",
                "--json"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["accuracy"] == pytest.approx(row.summary["test"])


def test_version_1_configs_keep_their_meaning():
    old = StudyConfig().to_dict()
    del old["calibration"]
    old["version"] = 1
    cfg = StudyConfig.from_dict(old)
    assert cfg.calibration == "none"
    assert StudyConfig(calibration="none").differences(cfg) == []
    assert StudyConfig().differences(cfg) == ["calibration"]
    with pytest.raises(ConfigError, match="--calibration 'platt' is invalid"):
        StudyConfig(calibration="platt")
