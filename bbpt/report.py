"""Compare studies on the same axes: a table and a four-panel plot of best-so-far train loss and dev accuracy
against calls and against seconds.

Everything comes from storage, so running, interrupted and finished studies compare alike. The axes are
cumulated from the trials themselves: each trial is one call (a backprop step counts its forward as one call)
and its seconds include the backward pass, so gradient and black-box runs land on the same axes honestly.
Dev scores are accuracy for every study, whatever metric it selects on, so the panels share one y axis;
each is placed at the calls and seconds at which the loop made that evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bbpt.selection import history
from bbpt.storage import Storage

METRIC = "accuracy"


@dataclass
class StudyReport:
    name: str
    optimizer: str
    state: str
    calls: np.ndarray           # cumulative, after each trial
    seconds: np.ndarray
    best_loss: np.ndarray       # best train loss so far, after each trial
    tokens: int
    dev_calls: np.ndarray       # at each dev evaluation
    dev_seconds: np.ndarray
    best_dev: np.ndarray        # best dev accuracy so far, at each dev evaluation
    dev: float | None           # of the prompt selected on dev
    test: float | None          # of the same prompt, scored once at the end
    dev_scores: np.ndarray = field(default_factory=lambda: np.array([]))   # at each dev evaluation, as scored
    # The test score of the prompt dev had selected, from each change of that choice (studies run with
    # test_curve; empty otherwise): what stopping the search there would have given.
    test_calls: np.ndarray = field(default_factory=lambda: np.array([]))
    test_seconds: np.ndarray = field(default_factory=lambda: np.array([]))
    test_scores: np.ndarray = field(default_factory=lambda: np.array([]))
    # the same prompts' dev score and dev loss, so reports can ask which of the two orders test better
    test_dev_scores: np.ndarray = field(default_factory=lambda: np.array([]))
    test_dev_losses: np.ndarray = field(default_factory=lambda: np.array([]))
    cum_tokens: np.ndarray = field(default_factory=lambda: np.array([]))     # cumulative, after each trial
    losses: np.ndarray = field(default_factory=lambda: np.array([]))         # each trial's train loss, as scored

    @property
    def dev_tied(self) -> bool:
        """More than one prompt reached the best dev score, so ``dev_ties`` chose which was kept (see study.py)."""
        return len(self.dev_scores) > 1 and np.count_nonzero(self.dev_scores == self.dev_scores.max()) > 1

    def reach(self, target: float) -> tuple[int, float] | None:
        """Calls and seconds at the first dev evaluation at or above ``target``; None if never."""
        hit = np.flatnonzero(self.best_dev >= target)
        return (int(self.dev_calls[hit[0]]), float(self.dev_seconds[hit[0]])) if hit.size else None


def gather(storage: Storage, name: str, metric: str = METRIC) -> StudyReport:
    """A study's curves and selected scores from storage; ``metric`` (accuracy or f1) is what the dev curve
    and the dev/test scores report."""
    row = storage.require_study(name)
    trials = storage.trials(row.id, with_z=False)
    evals = storage.evaluations(row.id)
    # Evaluations of trial None are the manual prompt, not a point on the search's curve; P0's dev score
    # (trial -1, written only with keep_start) is its first point: the prompt kept until a trial beats it.
    dev = sorted((e for e in evals if e.split == "dev" and e.trial_number is not None),
                 key=lambda e: (e.calls_at, e.id))
    selected = (row.summary or {}).get("selected_trial")
    if selected is None:
        ck = storage.last_checkpoint(row.id)
        selected = ck.loop_state.get("dev_best_trial") if ck else None
    score = {(e.trial_number, e.split): e.metrics.get(metric) for e in evals}
    dev_scores = np.array([e.metrics[metric] for e in dev])
    kept = history(dev, metric, row.config.get("dev_ties", "earliest"))
    if not kept or any((e.trial_number, "test") not in score for e in kept):
        kept = []          # no test curve (or a partial one, which would draw a wrong step)
    return StudyReport(
        name=name, optimizer=row.config["optimizer"], state=row.state,
        calls=np.cumsum([t.calls for t in trials]), seconds=np.cumsum([t.seconds for t in trials]),
        # a mini-batch trial's loss is on part of the training set: the curve follows whole-set losses only
        best_loss=np.fmin.accumulate([np.nan if "batch" in t.metrics else t.loss for t in trials])
        if trials else np.array([]),
        tokens=sum(t.tokens for t in trials), cum_tokens=np.cumsum([t.tokens for t in trials]),
        losses=np.array([t.loss for t in trials]),
        dev_calls=np.array([e.calls_at for e in dev]), dev_seconds=np.array([e.seconds_at for e in dev]),
        best_dev=np.maximum.accumulate(dev_scores) if dev else dev_scores,
        dev=score.get((selected, "dev")), test=score.get((selected, "test")), dev_scores=dev_scores,
        test_calls=np.array([e.calls_at for e in kept]), test_seconds=np.array([e.seconds_at for e in kept]),
        test_scores=np.array([score[(e.trial_number, "test")] for e in kept]),
        test_dev_scores=np.array([e.metrics[metric] for e in kept]),
        test_dev_losses=np.array([e.metrics["loss"] for e in kept]))


COMPARE_COLUMNS = ("study", "optimizer", "state", "calls", "tokens", "seconds", "best loss", "dev", "test")


def table_rows(reports: list[StudyReport], target: float | None = None) -> tuple[list[str], list[list[str]]]:
    """``bbpt compare``'s table as (header, rows of formatted cells): the terminal and the dashboard print it."""
    head = list(COMPARE_COLUMNS)
    if target is not None:
        head += ["calls@" + format(target, "g"), "s@" + format(target, "g")]
    rows = []
    for r in reports:
        last = lambda a, fmt: format(a[-1], fmt) if len(a) else "-"
        opt = lambda v: f"{v:.4f}" if v is not None else "-"
        row = [r.name, r.optimizer, r.state, last(r.calls, "d"), f"{r.tokens:,}", last(r.seconds, ".1f"),
               last(r.best_loss, ".4f"), opt(r.dev), opt(r.test)]
        if target is not None:
            hit = r.reach(target)
            row += [str(hit[0]) if hit else "never", f"{hit[1]:.1f}" if hit else "-"]
        rows.append(row)
    return head, rows


def format_table(reports: list[StudyReport], target: float | None = None) -> str:
    head, rows = table_rows(reports, target)
    widths = [28, 18, 9, 6, 11, 8, 9, 6, 6, 9, 8]
    left = {0, 1, 2}

    def line(cells):
        return " ".join(f"{c:{'<' if i in left else '>'}{widths[i]}}" for i, c in enumerate(cells))
    return "\n".join(line(c) for c in [head, *rows])


def figure(reports: list[StudyReport], target: float | None = None):
    """The four panels as a matplotlib Figure; one colour per study, the same in every panel."""
    from matplotlib.figure import Figure   # no pyplot: no global state, no GUI backend; saves with Agg

    fig = Figure(figsize=(11, 8), layout="constrained")
    axes = list(fig.subplots(2, 2).flat)
    xlabels = ("calls (forward passes over the training batch)", "seconds (scoring, backward included)")
    ylabels = ("best train loss so far", f"best dev {METRIC} so far")
    for i, r in enumerate(reports):
        series = [(r.calls, r.best_loss), (r.seconds, r.best_loss), dev_curve(r, "calls"), dev_curve(r, "seconds")]
        for k, (ax, (x, y)) in enumerate(zip(axes, series)):
            ax.step(x, y, where="post", color=f"C{i % 10}", label=f"{r.name} ({r.optimizer})",
                    marker="o" if k >= 2 else None, markersize=3)
    for k, ax in enumerate(axes):
        ax.set_xlabel(xlabels[k % 2])
        ax.set_ylabel(ylabels[k // 2])
        ax.grid(alpha=0.3)
        if target is not None and k >= 2:
            ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g}")
        if k % 2 == 0:
            ax.legend(fontsize="small")
    fig.suptitle("bbpt compare: " + ", ".join(r.name for r in reports))
    return fig


def plot(reports: list[StudyReport], path: str | Path, target: float | None = None) -> Path:
    path = Path(path)
    figure(reports, target).savefig(path, dpi=110)
    return path


def dev_curve(r: StudyReport, axis: str) -> tuple[np.ndarray, np.ndarray]:
    """Best-so-far dev score against ``axis`` ("calls" or "seconds"), held flat to the last trial: the loop
    scores a candidate on dev only when it is a new best on train, so after the last evaluation the best dev
    score stands until the search ends, and a curve stopping there would read as a shorter search."""
    x, end = (r.dev_calls, r.calls) if axis == "calls" else (r.dev_seconds, r.seconds)
    return _held(x, r.best_dev, end)


def test_curve(r: StudyReport, axis: str) -> tuple[np.ndarray, np.ndarray]:
    """The test score of the prompt selected on dev so far, against ``axis``, held flat to the last trial
    (empty for a study run without ``test_curve``). Unlike the dev curve it can go down: dev chooses."""
    x, end = (r.test_calls, r.calls) if axis == "calls" else (r.test_seconds, r.seconds)
    return _held(x, r.test_scores, end)


def _held(x: np.ndarray, y: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(x) and len(end) and end[-1] > x[-1]:
        return np.append(x, end[-1]), np.append(y, y[-1])
    return x, y


def _read_steps(x: np.ndarray, y: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """A best-so-far curve known at points ``x``, read at each ``grid`` value (NaN before its first point)."""
    idx = np.searchsorted(x, grid, side="right") - 1
    return np.where(idx >= 0, y[np.clip(idx, 0, None)], np.nan)


def band(reports: list[StudyReport], curve=None, axis: str = "calls"):
    """One arm's band over its studies (seeds): ``(grid, mean, min, max)`` of ``curve`` (:func:`dev_curve` or
    :func:`test_curve`) against ``axis``, read on the union of the studies' points. The report's plots and the
    dashboard's compare page both draw this, so the two show the same numbers."""
    curves = [(curve or dev_curve)(r, axis) for r in reports]
    # Start where every seed has its first point: a mean over the seeds that happen to have one would jump
    # when a slower seed joins.
    grid = np.unique(np.concatenate([x for x, _ in curves]))
    grid = grid[grid >= max(x[0] for x, _ in curves)]
    ys = np.array([_read_steps(x, y, grid) for x, y in curves])
    return grid, np.nanmean(ys, 0), np.nanmin(ys, 0), np.nanmax(ys, 0)


def band_figure(arms: list[tuple[str, list[StudyReport]]], *, levels: list[tuple[str, float]] = (),
                test_levels: list[tuple[str, float]] = (), metric: str = METRIC, title: str = ""):
    """Best-so-far dev ``metric`` against calls and against seconds, one band per arm: the mean over its
    studies (seeds) as a line and their min-to-max range shaded; and, when studies have test curves, a second
    row with the test score of the prompt selected on dev so far. Colours follow the order of ``arms`` (pass
    every arm, even one without studies yet, so an arm keeps its colour across figures). ``levels`` (and
    ``test_levels``) are arms with no search (a manual prompt), drawn as flat dashed lines at their mean."""
    from matplotlib.figure import Figure

    rows = [("dev", dev_curve, f"best dev {metric} so far", levels)]
    if any(len(r.test_scores) for _, reports in arms for r in reports):
        rows.append(("test", test_curve, f"test {metric} of the prompt\nselected on dev so far", test_levels))
    fig = Figure(figsize=(12.5, 4.5 * len(rows)), layout="constrained")
    axes = np.asarray(fig.subplots(len(rows), 2)).reshape(len(rows), 2)
    for row_axes, (what, curve, ylabel, flat) in zip(axes, rows):
        for i, (label, reports) in enumerate(arms):
            reports = [r for r in reports if len(curve(r, "calls")[0])]
            if not reports:
                continue
            for ax, axis in zip(row_axes, ("calls", "seconds")):
                grid, mean, lo, hi = band(reports, curve, axis)
                ax.step(grid, mean, where="post", color=f"C{i % 10}", label=f"{label} ({len(reports)})")
                ax.fill_between(grid, lo, hi, step="post", color=f"C{i % 10}", alpha=0.12, linewidth=0)
        for k, (label, value) in enumerate(flat):
            for ax in row_axes:
                ax.axhline(value, color=f"C{(len(arms) + k) % 10}", linestyle="--", linewidth=1, label=label)
        for ax, xlabel in zip(row_axes, ("calls (forward passes over the training batch)",
                                         "seconds (scoring, backward included)")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
    # Beside the panels, not on them: with eight arms a legend inside hides the curves.
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize="small", title="arm (seeds):\nmean, min-max",
               title_fontsize="small")
    fig.suptitle(title)
    return fig
