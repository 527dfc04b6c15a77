"""``--max-seconds``: a time budget beside --budget's calls. The study's seconds are read from a clock the test
controls (each generation's scoring takes exactly 0.5 s of it), so where the search stops is exact."""

from __future__ import annotations

import json
import types

import pytest

from bbpt.cli import main
from bbpt.config import StudyConfig
from bbpt.errors import ConfigError
from bbpt.storage import Storage
from bbpt.study import LoopState, limit_reached
from study_helpers import optimize_args


@pytest.fixture
def half_second_generations(monkeypatch):
    """bbpt.scoring's clock, advanced 0.5 s each time it is read: a generation's scoring reads it at its start
    and its end, so it takes 0.5 s."""
    import bbpt.scoring

    now = [0.0]

    def perf_counter():
        now[0] += 0.5
        return now[0]

    monkeypatch.setattr(bbpt.scoring, "time", types.SimpleNamespace(perf_counter=perf_counter))


def _run(tiny_model_dir, tmp_path, capsys, name, *extra, budget=80):
    url = f"sqlite:///{tmp_path / 'time.db'}"
    args = optimize_args(tiny_model_dir, url, name, budget=budget, runs_dir=tmp_path / "runs",
                         extra=("--calibration", "none", *extra))
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    store = Storage(url)
    trials = store.trials(store.require_study(name).id)
    return summary, [t.loss for t in trials]


def test_max_seconds_stops_the_search_and_a_larger_one_resumes_it(tiny_model_dir, tmp_path, capsys,
                                                                 half_second_generations):
    # 0.5 s a generation of 4 calls: 2.6 s buys 5 generations (a 6th would end at 3.0 s), 4.1 s buys 8.
    first, _ = _run(tiny_model_dir, tmp_path, capsys, "t", "--max-seconds", "2.6")
    assert (first["calls"], first["stopped"]) == (20, "max_seconds")
    assert first["seconds"] == pytest.approx(2.5)
    resumed, losses = _run(tiny_model_dir, tmp_path, capsys, "t", "--max-seconds", "4.1")
    assert (resumed["calls"], resumed["stopped"]) == (32, "max_seconds")
    # the same trials as one run given 4.1 s from the start: the resume went on where the first run stopped
    straight, straight_losses = _run(tiny_model_dir, tmp_path, capsys, "straight", "--max-seconds", "4.1")
    assert straight["calls"] == 32 and losses == straight_losses
    # --budget still caps calls; it is what stopped a run whose time was not spent
    capped, _ = _run(tiny_model_dir, tmp_path, capsys, "capped", "--max-seconds", "100", budget=12)
    assert (capped["calls"], capped["stopped"]) == (12, "budget")


def test_dev_is_checked_at_every_tenth_of_the_time_budget(tiny_model_dir, tmp_path, capsys,
                                                         half_second_generations):
    # --eval-every 1000 calls never falls due: every dev check here comes from the time budget's tenths
    # (0.4 s each, so every 0.5 s generation crosses one), and only a new best trial is checked again.
    _run(tiny_model_dir, tmp_path, capsys, "dev", "--max-seconds", "4.1", "--eval-every", "1000")
    store = Storage(f"sqlite:///{tmp_path / 'time.db'}")
    sid = store.require_study("dev").id
    searched = [e for e in store.evaluations(sid) if e.split == "dev" and e.trial_number is not None]
    assert len(searched) >= 2
    assert sorted(e.calls_at for e in searched) == sorted({e.calls_at for e in searched})


def test_limit_reached_names_the_limit_the_next_generation_would_pass():
    cfg = StudyConfig(optimizer="cma", budget=100, max_seconds=10.0)
    assert limit_reached(cfg, LoopState(calls=80, seconds=8.0, gen_seconds_max=1.0), 20) == ""
    assert limit_reached(cfg, LoopState(calls=80, seconds=9.5, gen_seconds_max=1.0), 20) == "max_seconds"
    assert limit_reached(cfg, LoopState(calls=81, seconds=0.0), 20) == "budget"


@pytest.mark.parametrize("value", [0.0, -5.0, float("nan"), float("inf")])
def test_a_max_seconds_that_is_not_a_positive_number_is_refused(value):
    with pytest.raises(ConfigError, match=r"--max-seconds .* must be a positive number of seconds"):
        StudyConfig(optimizer="cma", max_seconds=value)


def test_max_seconds_does_not_block_a_resume():
    a, b = StudyConfig(optimizer="cma", max_seconds=60.0), StudyConfig(optimizer="cma", max_seconds=600.0)
    assert a.differences(b) == []


def test_a_refused_max_seconds_writes_no_database(tmp_path, capsys):
    db = tmp_path / "refused.db"
    args = ["optimize", "--task", "sst2", "--max-seconds", "0", "--storage", f"sqlite:///{db}",
            "--runs-dir", str(tmp_path / "runs")]
    assert main(args) != 0
    assert "--max-seconds 0.0 is invalid" in capsys.readouterr().err
    assert not db.exists() and not (tmp_path / "runs").exists()
