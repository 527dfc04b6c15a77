"""What the dashboard's pages show, as JSON-ready data, read from storage in short read-only transactions.

The numbers come from the code the terminal uses: :func:`bbpt.report.gather` for a study's curves,
:func:`bbpt.report.table_rows` for ``bbpt compare``'s table, and :func:`bbpt.studyspec.markdown.task_table`
and :func:`bbpt.report.band` for a spec's arms, as ``bbpt study report`` prints and plots them.

Pages stay small however long a study is: best-so-far curves are sent through their change points only (a
step curve is exact from those), and the raw per-trial points are thinned to at most ``max_points`` with the
page saying how many it shows.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from sqlalchemy import func, select

from bbpt.errors import ConfigError
from bbpt.report import StudyReport, band, dev_curve, gather, table_rows, test_curve
from bbpt.storage import CheckpointRow, EvaluationRow, Storage, StudyRow, TrialRow
from bbpt.storage.models import WorkRow

MAX_POINTS = 2000       # raw trial points a study page draws (every one is still in the paged table)
AXES = ("calls", "seconds", "tokens")


def _num(v):
    """JSON has no NaN or infinity: send null (a curve with no point yet, a loss that was never finite)."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _nums(a) -> list:
    return [_num(v) for v in np.asarray(a, dtype=float)]


def version(storage: Storage, study: str | None = None) -> dict:
    """A cheap fingerprint of what is stored (one query): a page refetches only when it changes."""
    with storage.session() as s:
        if study is None:
            out = dict(studies=s.scalar(select(func.count(StudyRow.id))),
                       trials=s.scalar(select(func.max(TrialRow.id))),
                       evaluations=s.scalar(select(func.max(EvaluationRow.id))),
                       updated=str(s.scalar(select(func.max(StudyRow.updated)))))
            if storage.schema >= 2:     # claims and queued work (not lease renewals, which tick all the time)
                out["work"] = list(s.execute(select(func.count(WorkRow.id), func.sum(WorkRow.runs),
                                                    func.count(WorkRow.worker),
                                                    func.count(WorkRow.finished_at))).one())
            return out
        row = s.scalar(select(StudyRow).where(StudyRow.name == study))
        if row is None:
            return dict(missing=True)
        return dict(state=row.state,
                    trials=s.scalar(select(func.count(TrialRow.id)).where(TrialRow.study_id == row.id)),
                    evaluations=s.scalar(select(func.count(EvaluationRow.id)).where(EvaluationRow.study_id == row.id)))


def queue(storage: Storage) -> list[dict]:
    """The work table (``bbpt study queue`` and every claim): who runs what, and for how much longer."""
    import time

    from bbpt.storage.work import Work

    now = time.time()
    return [dict(name=r.name, spec=r.spec_name, state=r.state, worker=r.worker if r.lease_until > now else None,
                 lease_left=round(r.lease_until - now, 1) if r.worker and r.lease_until > now else None, runs=r.runs)
            for r in Work(storage).rows().values()]


def studies(storage: Storage) -> list[dict]:
    """One line per study: what ``bbpt studies list`` prints, plus the best train loss so far."""
    with storage.session() as s:
        rows = list(s.scalars(select(StudyRow).order_by(StudyRow.id)))
        # commit_generation keeps one checkpoint per study (the latest), so this reads one row each
        loops = {sid: loop for sid, loop in s.execute(
            select(CheckpointRow.study_id, CheckpointRow.loop_state).order_by(CheckpointRow.generation))}
    out = []
    for r in rows:
        cfg, summ, loop = r.config, r.summary or {}, loops.get(r.id) or {}
        out.append(dict(
            name=r.name, task=cfg.get("task") or cfg.get("data"), optimizer=cfg["optimizer"], state=r.state,
            calls=loop.get("calls", summ.get("calls", 0)), budget=cfg.get("budget"),
            best_loss=_num(summ.get("best_train_loss", loop.get("best_loss"))),
            dev=_num(summ["dev"]) if "dev" in summ else _num(loop.get("dev_best")),
            test=_num(summ.get("test")), metric=summ.get("metric"), updated=r.updated.isoformat()))
    return out


def _change_points(y: np.ndarray) -> np.ndarray:
    """Indices where a best-so-far curve takes a new value, and its last index: a step plot through them
    draws the same curve as through every point."""
    if not len(y):
        return np.array([], dtype=int)
    y = np.asarray(y, dtype=float)
    prev = np.concatenate([[np.nan], y[:-1]])
    keep = ~((y == prev) | (np.isnan(y) & np.isnan(prev)))
    keep[-1] = True
    return np.flatnonzero(keep)


def _thin(n: int, limit: int) -> np.ndarray:
    """At most ``limit`` evenly spaced indices of ``n``, first and last included."""
    if n <= limit:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(int))


def _x(rep: StudyReport, idx: np.ndarray) -> dict:
    return dict(calls=_nums(rep.calls[idx]), seconds=_nums(rep.seconds[idx]), tokens=_nums(rep.cum_tokens[idx]))


def _at_calls(rep: StudyReport, calls: np.ndarray) -> list:
    """Cumulative tokens at the trials where evaluations were made (they record calls and seconds only)."""
    if not len(rep.calls):
        return []
    idx = np.clip(np.searchsorted(rep.calls, calls, side="right") - 1, 0, len(rep.calls) - 1)
    return _nums(rep.cum_tokens[idx])


def study(storage: Storage, name: str, max_points: int = MAX_POINTS) -> dict:
    """One study's page: its settings, best-so-far train loss (change points), thinned raw losses, and dev
    (and, with test_curve, test) scores of the evaluations, each against calls, seconds and tokens."""
    row = storage.require_study(name)
    metric = (row.summary or {}).get("metric", "accuracy")
    rep = gather(storage, name, metric if metric in ("accuracy", "f1") else "accuracy")
    best = _change_points(rep.best_loss)
    raw = _thin(len(rep.losses), max_points)
    return dict(
        name=name, state=row.state, optimizer=rep.optimizer, metric=metric, config=row.config,
        summary=row.summary, model=row.model, bbpt_version=row.bbpt_version, created=row.created.isoformat(),
        trials=len(rep.losses), budget=row.config.get("budget"),
        best_loss=dict(y=_nums(rep.best_loss[best]), **_x(rep, best)),
        raw=dict(y=_nums(rep.losses[raw]), shown=len(raw), of=len(rep.losses), **_x(rep, raw)),
        dev=dict(y=_nums(rep.dev_scores), best=_nums(rep.best_dev), calls=_nums(rep.dev_calls),
                 seconds=_nums(rep.dev_seconds), tokens=_at_calls(rep, rep.dev_calls)),
        test=dict(y=_nums(rep.test_scores), calls=_nums(rep.test_calls), seconds=_nums(rep.test_seconds),
                  tokens=_at_calls(rep, rep.test_calls)),
        selected=dict(dev=_num(rep.dev), test=_num(rep.test)))


def trials_page(storage: Storage, name: str, offset: int = 0, limit: int = 50) -> dict:
    """One page of a study's trial table, cut by the database (LIMIT/OFFSET), never the whole table."""
    row = storage.require_study(name)
    limit = max(1, min(int(limit), 500))
    offset = max(0, int(offset))
    cols = (TrialRow.number, TrialRow.generation, TrialRow.loss, TrialRow.metrics, TrialRow.calls,
            TrialRow.tokens, TrialRow.seconds, TrialRow.backward_seconds, TrialRow.state)
    with storage.session() as s:
        total = s.scalar(select(func.count(TrialRow.id)).where(TrialRow.study_id == row.id))
        got = s.execute(select(*cols).where(TrialRow.study_id == row.id).order_by(TrialRow.number)
                        .offset(offset).limit(limit)).all()
    rows = [dict(number=n, generation=g, loss=_num(loss), accuracy=_num((m or {}).get("accuracy")),
                 batch=(m or {}).get("batch"), prompt=(m or {}).get("prompt"), calls=c, tokens=t,
                 seconds=_num(sec), backward_seconds=_num(b), state=st)
            for n, g, loss, m, c, t, sec, b, st in got]
    return dict(total=total, offset=offset, limit=limit, rows=rows)


def compare_studies(storage: Storage, names: list[str]) -> dict:
    """Several studies side by side: ``bbpt compare``'s table and each one's dev curve, per axis."""
    reports = [gather(storage, n) for n in names]
    head, rows = table_rows(reports)
    lines = []
    for r in reports:
        line = dict(name=r.name)
        for axis in ("calls", "seconds"):
            x, y = dev_curve(r, axis)
            line[axis] = dict(x=_nums(x), y=_nums(y))
        lines.append(line)
    return dict(kind="studies", head=head, rows=rows, lines=lines, axes=["calls", "seconds"])


def compare_spec(storage: Storage, spec, task: str) -> dict:
    """A spec's arms on one task, as ``bbpt study report`` shows them: its table, and per searching arm the
    mean line and min-max band over seeds (faint seed lines under them), untuned arms as levels."""
    from bbpt.studyspec.markdown import spec_cells, task_table

    if task not in spec.tasks:
        raise ConfigError(f"task {task!r} is not in spec {spec.name!r}; its tasks are {spec.tasks}")
    _, cells = spec_cells(spec, storage)
    head, rows = task_table(spec, task, cells)
    panels = []
    for what, curve in (("dev", dev_curve), ("test", test_curve)):
        arms, levels = [], []
        for arm in spec.arms:
            got = cells.get((task, arm.name), [])
            if not arm.tuned:
                if got:
                    levels.append(dict(arm=arm.name, value=_num(np.mean([s[what] for _, s in got]))))
                continue
            reports = [r for r, _ in got if len(curve(r, "calls")[0])]
            entry = dict(arm=arm.name, seeds=len(reports))
            for axis in ("calls", "seconds"):
                if reports:
                    grid, mean, lo, hi = band(reports, curve, axis)
                    entry[axis] = dict(x=_nums(grid), mean=_nums(mean), lo=_nums(lo), hi=_nums(hi),
                                       seeds=[dict(x=_nums(x), y=_nums(y)) for x, y in
                                              (curve(r, axis) for r in reports)])
            arms.append(entry)
        if what == "test" and not any("calls" in a for a in arms):
            continue            # no study ran with test_curve: the report draws no test row either
        panels.append(dict(split=what, arms=arms, levels=levels))
    return dict(kind="spec", spec=spec.name, task=task, tasks=spec.tasks, head=head, rows=rows, panels=panels,
                axes=["calls", "seconds"])


def prompt_dir(row: StudyRow, runs_dir: str | Path | None) -> Path | None:
    """Where a complete study saved its prompt: ``--runs`` (or the spec's runs folder) first, then the path
    its summary recorded; None if neither holds one."""
    candidates = []
    if runs_dir is not None:
        candidates.append(Path(runs_dir) / row.name)
    if row.summary and row.summary.get("prompt_path"):
        candidates.append(Path(row.summary["prompt_path"]))
    for c in candidates:
        if (c / "prompt.json").exists():
            return c
    return None
