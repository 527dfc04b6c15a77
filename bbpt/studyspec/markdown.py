"""``bbpt study report``: a markdown report and one PNG per task, rebuilt from the storage alone.

Everything printed comes from the spec and the stored studies, in the spec's order (tasks, then arms, seeds
in the order listed), so the same storage gives a byte-identical report; the only dates are the first and
last moments recorded in the storage itself. Only complete studies count: test is scored once, at the end.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import bbpt
from bbpt.config import AUTO_DEMOS
from bbpt.errors import StorageError
from bbpt.report import StudyReport, band_figure, gather
from bbpt.selection import order_check
from bbpt.storage import Storage
from bbpt.studyspec.runner import duration
from bbpt.studyspec.spec import Arm, StudySpec

LEGEND = """\
How to read the columns: *dev* is the prompt selected on dev (for manual and icl, the fixed prompt) and
*test* the same prompt, scored once at the end; both are mean ± sample standard deviation over seeds, in
percent. *calls* counts forward passes of one candidate over the training batch (a backprop step is one
call, its backward pass shows in *seconds*); *tokens* are those the calls processed; *seconds* is their
scoring time. All three are means per study and cover the search only. *calls to reach* is the first dev
evaluation (made every `eval_every` calls) at which a study's best dev score was at least the reference
arm's mean dev score: the mean over the seeds that got there, with how many did."""


def write_report(spec: StudySpec, *, storage_url: str | None = None, out: str | Path | None = None,
                 spec_arg: str | None = None) -> Path:
    """Write ``<results>/<spec>.md`` and ``<results>/<spec>-<task>.png``; returns the markdown's path."""
    try:
        # Read-only: a report only reads, and a read-write open would switch a committed file to WAL mode,
        # changing its header bytes (a spurious diff in git).
        storage = Storage(spec.storage_url(storage_url), read_only=True)
    except StorageError as e:
        raise StorageError(f"{e}; for a study spec, run `bbpt study run {spec_arg or spec.path}` first") from None
    out = Path(out) if out else spec.results_dir / f"{spec.name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, cells = spec_cells(spec, storage)
    lines = _header(spec, storage_url, spec_arg, [r for r in rows.values() if r is not None], cells)
    for task in spec.tasks:
        lines += _task_section(spec, task, cells, out)
    if len(spec.tasks) > 1:
        lines += _overview(spec, cells)
    if spec.reference:
        lines += _paired(spec, cells)
    lines += ["## Arms", ""] + [f"- `{a.name}`: {_describe(spec, a)}" for a in spec.arms] + ["", LEGEND, ""]
    reading = out.parent / f"{spec.name}.reading.md"
    lines += ["## Reading", ""]
    lines += [reading.read_text().strip(), ""] if reading.exists() else [
        f"No written reading yet: put one in `{reading.name}` next to this file and rerun the report.", ""]
    out.write_text("\n".join(lines))
    return out


def _header(spec: StudySpec, storage_url, spec_arg, rows, cells) -> list[str]:
    arg = spec_arg or str(spec.path)
    storage = f"`{storage_url or spec.storage}`" if storage_url or spec.storage else \
        f"`results/{spec.name}.db` (next to the spec)"
    flag = f" --storage {storage_url}" if storage_url else ""
    done = [r for r in rows if r.state == "complete"]
    summaries = [s for v in cells.values() for _, s in v]
    reports = [r for v in cells.values() for r, _ in v]
    lines = [f"# Study `{spec.name}`", "",
             f"- reproduce: `bbpt study run {arg}{flag}`, then `bbpt study report {arg}{flag}`",
             f"- spec: `{arg}` (sha256 {spec.sha256[:16]}); storage: {storage}",
             f"- report written by bbpt {bbpt.__version__}; studies run by bbpt "
             f"{', '.join(sorted({r.bbpt_version for r in done})) or '-'}",
             f"- model: `{spec.plan[0].config.model}`; seeds: {', '.join(map(str, spec.seeds))}; "
             + _shots(spec.plan[0].config),
             f"- studies: {len(done)}/{len(spec.plan)} complete"]
    if done:
        first = min(r.created for r in done).strftime("%Y-%m-%d %H:%M")
        last = max(r.updated for r in done).strftime("%Y-%m-%d %H:%M")
        lines[-1] += f", run between {first} and {last} UTC"
    for m in sorted({s.get("machine", "not recorded") for s in summaries}):
        lines.append(f"- machine: {m}")
    wall = sum(s.get("wall_seconds", s["seconds"]) for s in summaries)
    scoring = sum(float(r.seconds[-1]) for r in reports if len(r.seconds))
    lines += [f"- total time: {duration(wall)} of study wall time (summed over studies), of which "
              f"{duration(scoring)} scoring calls of the searches"]
    searched = [r for r in reports if len(r.dev_scores)]
    if searched:
        rules = {p.config.dev_ties for p in spec.plan if p.arm.tuned}
        kept = ("the earliest was kept (a later prompt must score strictly higher)" if rules == {"earliest"} else
                "the one with the lowest dev loss was kept (`dev_ties = \"loss\"`)" if rules == {"loss"} else
                "the arms' `dev_ties` chose which was kept")
        lines.append(f"- dev ties: in {sum(r.dev_tied for r in searched)} of {len(searched)} tuned studies more "
                     f"than one prompt reached the best dev score; {kept}, so many ties say the dev set is too "
                     "small to choose (`dev_shots`)")
        lines += _order_line(searched)
    return lines + [""]


def _order_line(searched: list[StudyReport]) -> list[str]:
    """Whether dev score (the rule) or dev loss would have chosen better, on the prompts a test curve scored."""
    c = order_check([list(zip(r.test_dev_scores, r.test_dev_losses, r.test_scores))
                     for r in searched if len(r.test_scores) > 1])
    if not c.pairs:
        return []
    return [f"- dev score or dev loss: of {c.pairs} pairs of prompts that dev kept in turn within a study (test "
            f"curves; pairs tied on dev score or on test left out), the higher dev score also scored higher on "
            f"test in {c.score_right} and the lower dev loss in {c.loss_right}; in the {c.disagree} pairs where "
            f"the two disagree, dev loss picked the better prompt {c.loss_right_when_disagree} times"]


def spec_cells(spec: StudySpec, storage: Storage):
    """The spec's stored study rows by name (None where not started), and its complete studies' reports and
    summaries by (task, arm): what the report (and the dashboard's compare page) is built from."""
    rows = {p.name: storage.get_study(p.name) for p in spec.plan}
    cells: dict[tuple[str, str], list[tuple[StudyReport, dict]]] = {}
    for p in spec.plan:
        row = rows[p.name]
        if row is not None and row.state == "complete" and row.summary:
            rep = gather(storage, p.name, row.summary["metric"])
            cells.setdefault((p.task, p.arm.name), []).append((rep, row.summary))
    return rows, cells


def task_table(spec: StudySpec, task: str, cells) -> tuple[list[str], list[list[str]]]:
    """A classification task's table (header, rows of cells as printed): one row per arm, mean ± std over
    seeds of dev and test, calls, tokens, seconds, and calls to reach the reference arm's dev score."""
    from bbpt.tasks.builtin import CLASSIFICATION

    metric = CLASSIFICATION[task].metric
    name = "macro-F1" if metric == "f1" else "accuracy"
    ref = cells.get((task, spec.reference), []) if spec.reference else []
    target = float(np.mean([s["dev"] for _, s in ref])) if ref else None
    head = ["arm", "optimizer", "seeds", f"dev {name}", f"test {name}", "calls", "tokens", "seconds"]
    if target is not None:
        head.append(f"calls to reach dev {100 * target:.1f} ({spec.reference})")
    rows = []
    for arm in spec.arms:
        got = cells.get((task, arm.name), [])
        row = [arm.name, arm.optimizer, f"{len(got)}/{len(spec.seeds)}"]
        if got:
            reports, sums = zip(*got)
            row += [_pm([s["dev"] for s in sums]), _pm([s["test"] for s in sums])]
            row += [_mean([s["calls"] for s in sums], "{:,.0f}"), _mean([s["tokens"] for s in sums], "{:,.0f}"),
                    _mean([s["seconds"] for s in sums], "{:,.1f}")] if arm.tuned else ["-", "-", "-"]
            if target is not None:
                row.append(_reach(reports, target) if arm.tuned else "-")
        else:
            row += ["-"] * (len(head) - 3)
        rows.append(row)
    return head, rows


def _task_section(spec: StudySpec, task: str, cells, out: Path) -> list[str]:
    from bbpt.tasks.builtin import CLASSIFICATION

    if task not in CLASSIFICATION:
        return _generation_section(spec, task, cells, out)
    metric = CLASSIFICATION[task].metric
    name = "macro-F1" if metric == "f1" else "accuracy"
    head, rows = task_table(spec, task, cells)
    lines = _table_head(spec, task, head) + ["| " + " | ".join(row) + " |" for row in rows] + [""]
    lines += _budget_table(spec, task, cells, name)
    png = _plot(spec, task, cells, metric, out)
    if png:
        lines += [f"![best-so-far dev {name} on {task}, against calls and seconds]({png.name})", ""]
    return lines


BUDGETS = (100, 200, 300, 400, 600, 1000, 2000)


def _budget_table(spec: StudySpec, task: str, cells, name: str) -> list[str]:
    """Test of the prompt dev had selected by each budget (calls), mean over seeds: where every arm stands at
    any budget up to its own, read off its test curve (arms run with ``test_curve`` only). A budget past an
    arm's own is left blank rather than held: its search stopped there."""
    from bbpt.report import _read_steps, test_curve

    rows = []
    for arm in spec.arms:
        reports = [r for r, _ in cells.get((task, arm.name), []) if len(r.test_scores)]
        if not arm.tuned or not reports:
            continue
        cols = []
        for b in BUDGETS:
            got = [_read_steps(*test_curve(r, "calls"), np.array([b]))[0]
                   for r in reports if len(r.calls) and r.calls[-1] >= b]
            ok = len(got) == len(reports) and not np.isnan(got).any()
            cols.append(f"{100 * np.mean(got):.1f}" if ok else "")
        if any(cols):       # an arm shorter than the first budget (backprop's 20 steps) has nothing to show
            rows.append(f"| {arm.name} | {len(reports)} | " + " | ".join(cols) + " |")
    if not rows:
        return []
    return [f"Test {name} of the prompt selected on dev by each budget (calls; mean over the seeds that ran "
            "that far, test scored for reporting only):", "",
            "| arm | seeds | " + " | ".join(f"{b:,}" for b in BUDGETS) + " |", "|" + "---|" * (len(BUDGETS) + 2),
            *rows, ""]


GENERATION_LEGEND = """Generation columns: *dev NLL* is the mean negative log-likelihood per reference token of the prompt selected on
dev (selection compares it: cheap, no generation), *test NLL* the same on test's first reference; BLEU (corpus,
multi-reference, sacrebleu), ROUGE-L (F1 against the best reference, rouge-score) and slot coverage (share of
the input's values found verbatim in the answer; familyFriendly left out) score the greedy answers on test,
once. All are mean ± sample standard deviation over seeds."""


def _generation_section(spec: StudySpec, task: str, cells, out: Path) -> list[str]:
    head = ["arm", "optimizer", "seeds", "dev NLL", "test NLL", "test BLEU", "test ROUGE-L", "test slot coverage",
            "calls", "tokens", "seconds"]
    lines = _table_head(spec, task, head)
    for arm in spec.arms:
        got = cells.get((task, arm.name), [])
        row = [arm.name, arm.optimizer, f"{len(got)}/{len(spec.seeds)}"]
        if got:
            sums = [s for _, s in got]
            row += [_pm_raw([-s["dev"] for s in sums], "{:.3f}"), _pm_raw([-s["test"] for s in sums], "{:.3f}")]
            row += [_pm_raw([s.get(f"test_{k}") for s in sums], "{:.1f}") for k in ("bleu", "rouge_l", "slot_coverage")]
            row += [_mean([s["calls"] for s in sums], "{:,.0f}"), _mean([s["tokens"] for s in sums], "{:,.0f}"),
                    _mean([s["seconds"] for s in sums], "{:,.1f}")] if arm.tuned else ["-", "-", "-"]
        else:
            row += ["-"] * (len(head) - 3)
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", GENERATION_LEGEND, ""]
    png = _plot(spec, task, cells, "logprob", out)
    if png:
        lines += [f"![best-so-far dev log-prob per target token on {task}, against calls and seconds]({png.name})",
                  ""]
    return lines


def _table_head(spec: StudySpec, task: str, head: list[str]) -> list[str]:
    """A task section's title, its own settings, and its table's header."""
    lines = [f"## {task}", ""]
    if spec.task_settings.get(task):
        lines += ["Settings for this task: " + ", ".join(f"{k} = {v}" for k, v in spec.task_settings[task].items())
                  + ".", ""]
    own = [f"{a.name}: " + ", ".join(f"{k} = {v}" for k, v in a.task_settings[task].items())
           for a in spec.arms if a.task_settings.get(task)]
    if own:
        lines += ["Arm settings for this task: " + "; ".join(own) + ".", ""]
    return lines + ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]


def _pm_raw(values, fmt: str) -> str:
    """Mean ± sample std of values as they are (not percent); "-" where a study did not record one."""
    if any(v is None for v in values):
        return "-"
    v = np.asarray(values, dtype=float)
    if len(v) == 1:
        return fmt.format(v.mean()) + " (one seed)"
    return f"{fmt.format(v.mean())} ± {fmt.format(v.std(ddof=1))}"


def _plot(spec: StudySpec, task: str, cells, metric: str, out: Path) -> Path | None:
    arms = [(a.name, [r for r, _ in cells.get((task, a.name), [])]) for a in spec.arms if a.tuned]
    if not any(len(r.best_dev) for _, reports in arms for r in reports):
        return None
    levels = {split: [(f"{a.name} (mean)", float(np.mean([s[split] for _, s in cells[(task, a.name)]])))
                      for a in spec.arms if not a.tuned and cells.get((task, a.name))] for split in ("dev", "test")}
    path = out.parent / f"{spec.name}-{task}.png"
    band_figure(arms, levels=levels["dev"], test_levels=levels["test"], metric=metric,
                title=f"{spec.name}: {task}").savefig(path, dpi=110)
    return path


def _overview(spec: StudySpec, cells) -> list[str]:
    """Test scores of every arm on every task, side by side (the suite's headline)."""
    lines = ["## All tasks: test score (mean ± std over seeds, %)", "",
             "| arm | " + " | ".join(spec.tasks) + " | mean |", "|" + "---|" * (len(spec.tasks) + 2)]
    for arm in spec.arms:
        means, row = [], [arm.name]
        for task in spec.tasks:
            got = cells.get((task, arm.name))
            row.append(_pm([s["test"] for _, s in got]) if got else "-")
            means += [float(np.mean([s["test"] for _, s in got]))] if got else []
        row.append(f"{100 * np.mean(means):.1f}" if len(means) == len(spec.tasks) else "-")
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


# The time a searching arm is compared at, in multiples of the reference arm's search seconds on the same task
# and seed: the black-box goal of issue 16 ("within 3 points of backprop in 2x its wall time").
TIME_CAP = 2.0


def _paired(spec: StudySpec, cells) -> list[str]:
    """Each tuned arm against the reference arm on the same task and seed. The overview's means can mix seeds
    (an arm with seed 0 only beside a reference with three); these tables compare like with like: the test
    difference at the arm's whole budget with its seconds over the reference's, and the test difference of the
    prompt dev had selected once the arm had spent TIME_CAP x the reference's seconds (read off the test
    curve, so only for arms that score one), however its budget was sized."""
    ref = spec.reference
    head = ["| arm | " + " | ".join(spec.tasks) + " | mean |", "|" + "---|" * (len(spec.tasks) + 2)]
    whole, capped = [], []
    for arm in (a for a in spec.arms if a.tuned and a.name != ref):
        by_task = []
        for task in spec.tasks:
            base = {s["seed"]: s for _, s in cells.get((task, ref), [])}
            by_task.append([(r, s, base[s["seed"]]) for r, s in cells.get((task, arm.name), []) if s["seed"] in base])
        whole.append(_gap_row(arm.name, [[(s["test"], b["test"], s["seconds"] / b["seconds"]) for _, s, b in p]
                                         for p in by_task]))
        at_cap = [[(_test_by(r, TIME_CAP * b["seconds"]), b["test"], None) for r, _, b in p] for p in by_task]
        at_cap = [p if all(t is not None for t, *_ in p) else [] for p in at_cap]   # a task without a curve: "-"
        if any(at_cap):
            capped.append(_gap_row(arm.name, at_cap))
    lines = [f"## Against `{ref}`, seed by seed", "",
             f"Test points over `{ref}` on the same task and seed, the mean over the seeds both arms completed "
             f"(how many), with the arm's search seconds over `{ref}`'s; the last column averages the tasks only "
             "when every task has a pair.", ""] + head + whole + [""]
    if capped:
        lines += [f"The same, for the prompt dev had selected when the arm had spent {TIME_CAP:g}x `{ref}`'s "
                  "search seconds on that seed (read off the test curve; where the arm finished sooner, its "
                  "selected prompt):", ""] + head + capped + [""]
    return lines


def _gap_row(arm: str, by_task: list[list[tuple]]) -> str:
    """A table row from each task's (arm's test, reference's test, seconds ratio or None) per paired seed."""
    cells, gaps = [arm], []
    for got in by_task:
        if not got:
            cells.append("-")
            continue
        gaps.append(100 * float(np.mean([a - b for a, b, _ in got])))
        ratio = "" if got[0][2] is None else f"; {np.mean([r for *_, r in got]):.2f}x"
        cells.append(f"{gaps[-1]:+.1f} ({len(got)}{ratio})")
    cells.append(f"{np.mean(gaps):+.1f}" if len(gaps) == len(by_task) else "-")
    return "| " + " | ".join(cells) + " |"


def _test_by(r: StudyReport, seconds: float) -> float | None:
    """Test score of the prompt dev had selected by ``seconds`` of search (None: no test curve, or nothing
    selected yet)."""
    if not len(r.test_seconds):
        return None
    if r.seconds[-1] <= seconds:         # the whole search fit: its selected prompt
        return r.test
    i = int(np.searchsorted(r.test_seconds, seconds, side="right")) - 1
    return float(r.test_scores[i]) if i >= 0 else None


def _shots(cfg) -> str:
    # A generation task has no classes: its shots count examples.
    unit = "examples per class" if _classifies(cfg.task) else "examples"
    if cfg.dev_shots is None or cfg.dev_shots == cfg.shots:
        return f"{cfg.shots} {unit} in train and in dev"
    return f"{cfg.shots} {unit} in train, {cfg.dev_shots} in dev"


def _classifies(task: str) -> bool:
    from bbpt.tasks.builtin import CLASSIFICATION

    return task in CLASSIFICATION


def _describe(spec: StudySpec, arm: Arm) -> str:
    """The settings an arm's studies ran with (those that matter for its optimizer), from the plan."""
    cfg = next(p.config for p in spec.plan if p.arm is arm)
    if arm.optimizer == "manual":
        return "the task's manual prompt, no tuning"
    if arm.optimizer == "icl":
        per = " per class" if _classifies(cfg.task) else ""
        return f"{arm.demos_per_class} solved train example(s){per} before the manual prompt, no tuning"
    parts = [arm.optimizer, f"budget {cfg.budget} calls", f"{cfg.prompt_tokens} prompt tokens", f"init {cfg.init}",
             f"space {cfg.space}"]
    if cfg.prompt_position:
        parts.append(f"prompt {cfg.prompt_position}")
    if cfg.demos_auto:
        where = " and ".join(AUTO_DEMOS[cfg.demos]).replace("train", "training")
        parts.append(f"1 demonstration per class if it lowers P0's {where} loss (demos {cfg.demos})")
    elif cfg.demos:
        parts.append(f"{cfg.demos} demonstration(s) per class before every input")
    if cfg.dtype != "float32":          # float32 is the default and what most arms ran; say when it is not
        parts.append(f"model in {cfg.dtype}")
    if cfg.space == "projected":
        parts += [f"d {cfg.intrinsic_dim}", f"alpha {cfg.alpha:g}"]
    parts += [f"lr {cfg.lr:g}"] if arm.optimizer == "backprop" else [f"popsize {cfg.popsize}", f"sigma0 {cfg.sigma0:g}"]
    if arm.task_settings:     # the first task's values were shown; say which ones vary
        varied = sorted({k for t in arm.task_settings.values() for k in t})
        parts.append(f"{cfg.task}'s {', '.join(varied)} shown (set per task: see each task)")
    return ", ".join(parts) + f", loss {cfg.loss}, dev every {cfg.eval_every} calls"


def _pm(values) -> str:
    v = 100 * np.asarray(values, dtype=float)
    # One seed has no spread to show; "± 0.0" would claim one.
    return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if len(v) > 1 else f"{v.mean():.1f} (one seed)"


def _mean(values, fmt: str) -> str:
    return fmt.format(float(np.mean(values)))


def _reach(reports, target: float) -> str:
    hits = [h for h in (r.reach(target) for r in reports) if h]
    n = f"({len(hits)}/{len(reports)})"
    return f"{np.mean([h[0] for h in hits]):,.0f} {n}" if hits else f"never {n}"

