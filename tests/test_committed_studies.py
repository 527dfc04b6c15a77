"""The study specs under studies/ and the results committed beside them.

Every committed spec must load and plan (a spec that no longer matches the code fails here, not in a user's
five-hour run), and a committed report must be what `bbpt study report` writes from the committed storage:
the numbers in studies/results/ are traceable to the database next to them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bbpt.studyspec import load_spec, write_report

REPO = Path(__file__).resolve().parents[1]
SPECS = sorted((REPO / "studies").glob("*.toml"))


def test_there_are_specs():
    assert {p.name for p in SPECS} >= {"sst2_gradient_vs_dfo.toml", "bbt_suite.toml"}


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_committed_spec_loads_and_plans_every_arm_seed_and_task(path):
    spec = load_spec(path)
    assert len(spec.plan) == len(spec.arms) * len(spec.seeds) * len(spec.tasks)
    assert len(spec.seeds) >= 3, "issue 7 asks for at least 3 seeds per arm"
    assert len({p.name for p in spec.plan}) == len(spec.plan)


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_committed_report_is_rebuilt_from_committed_storage(path, tmp_path, monkeypatch):
    results = path.parent / "results"
    db, md = results / f"{path.stem}.db", results / f"{path.stem}.md"
    if not db.exists() or not md.exists():
        pytest.skip(f"no committed results for studies/{path.name} yet")
    # The same layout in a scratch folder, so opening the database cannot touch the committed file; the
    # report names the spec as it was given (relative to the repository) and includes the written reading.
    (tmp_path / "studies" / "results").mkdir(parents=True)
    shutil.copy(path, tmp_path / "studies" / path.name)
    for f in (db, results / f"{path.stem}.reading.md"):
        if f.exists():
            shutil.copy(f, tmp_path / "studies" / "results" / f.name)
    monkeypatch.chdir(tmp_path)
    rel = f"studies/{path.name}"
    out = write_report(load_spec(rel), spec_arg=rel)
    assert out.read_text() == md.read_text()


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_committed_studies_are_current_under_todays_defaults(path, tmp_path):
    """A change of defaults must not make a committed study stale (config version 5's recipe, gn with
    demonstrations chosen per task, applies only to a study that names no optimizer, and every arm names one),
    so `bbpt study run` resumes each as it ran and reports it as current."""
    from bbpt.storage import Storage
    from bbpt.studyspec.runner import status

    db = path.parent / "results" / f"{path.stem}.db"
    if not db.exists():
        pytest.skip(f"no committed results for studies/{path.name} yet")
    shutil.copy(db, tmp_path / db.name)         # opening a database may write to it
    rows = status(load_spec(path), Storage(f"sqlite:///{tmp_path / db.name}"))
    stale = {s.study.name: s.stale for s in rows if s.stale and s.state != "new"}
    assert not stale, f"stored studies that the spec no longer plans as they ran: {stale}"
    assert any(s.state == "complete" for s in rows)
