"""A study killed with SIGKILL at random moments and resumed each time stores exactly the trials of an
uninterrupted run with the same seed, and selects the same prompt."""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import time

import numpy as np
import pytest

from study_helpers import cli, optimize_args, spawn, trial_rows


def stored(url, study) -> int:
    try:
        return len(trial_rows(url, study))
    except sqlite3.OperationalError:     # no database or no tables yet
        return 0


def _run_with_kills(args, cwd, url, study, moments):
    """Run the study, SIGKILL it at each moment — (stored trials at least, then seconds more) — and rerun
    the same command until it finishes on its own; returns its summary and how many kills landed."""
    kills = 0
    for at_least, delay in [*moments, (None, 0)]:
        proc = spawn(args, cwd)
        if at_least is not None:
            while proc.poll() is None and stored(url, study) < at_least:
                time.sleep(0.01)
            time.sleep(delay)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.communicate()
                kills += 1
                continue
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        return json.loads(out.strip().splitlines()[-1]), kills


@pytest.mark.parametrize("optimizer,budget", [("cma", 40), ("backprop", 12)])
def test_sigkill_and_resume_equals_an_uninterrupted_run(tmp_path, tiny_model_dir, optimizer, budget):
    ref_url, url = f"sqlite:///{tmp_path / 'ref.sqlite'}", f"sqlite:///{tmp_path / 'db.sqlite'}"
    ref = cli(optimize_args(tiny_model_dir, ref_url, "s", optimizer=optimizer, budget=budget,
                            runs_dir=tmp_path / "ref-runs"), tmp_path)
    assert ref.returncode == 0, ref.stderr
    ref_summary = json.loads(ref.stdout.strip().splitlines()[-1])

    rng = random.Random(1234)
    # One kill during start-up (study creation, model load), some mid-search, one once all trials are in
    # (dev selection, test scoring, saving); the random part picks the instant within each phase.
    moments = [(0, rng.uniform(0.5, 3.0))] + [(n, rng.uniform(0, 0.2)) for n in
                                              sorted(rng.sample(range(1, budget), 3))] + [(budget, 0.05)]
    summary, kills = _run_with_kills(optimize_args(tiny_model_dir, url, "s", optimizer=optimizer, budget=budget),
                                     tmp_path, url, "s", moments)
    assert kills >= 3, f"only {kills} kills landed before the run finished; the test would prove little"

    got, want = trial_rows(url, "s"), trial_rows(ref_url, "s")
    assert [r[0] for r in got] == list(range(budget))           # contiguous, none lost, none twice
    assert [r[1] for r in got] == [r[1] for r in want]
    for (n, _, z, loss), (_, _, z_ref, loss_ref) in zip(got, want):
        np.testing.assert_allclose(np.frombuffer(z, "<f4"), np.frombuffer(z_ref, "<f4"), atol=1e-6,
                                   err_msg=f"trial {n}")
        assert loss == pytest.approx(loss_ref, abs=1e-6), f"trial {n}"
    for key in ("selected_trial", "best_train_loss", "dev", "test", "calls"):
        assert summary[key] == pytest.approx(ref_summary[key], abs=1e-6), key
