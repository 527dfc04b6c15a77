"""``bbpt study run``: every study a spec plans, in order, into one storage; complete ones are skipped.

Tuned arms go through the same :class:`~bbpt.session.Session` and :func:`~bbpt.study.run` as
``bbpt optimize``, so a study interrupted anywhere resumes from its last stored generation. A complete study
is skipped only if the spec still asks for what it ran: if the spec changed a setting that changes results,
the run stops and says which study and which setting, rather than mixing old and new numbers in a report.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import dataclass, replace

from bbpt.config import StudyConfig
from bbpt.errors import ConfigError, ObjectiveError, OptimizerError, StudyError
from bbpt.storage import Storage
from bbpt.studyspec.spec import Planned, StudySpec

log = logging.getLogger(__name__)


@dataclass
class Status:
    study: Planned
    state: str          # new | running | failed | complete
    calls: int
    stale: list[str]    # settings that differ between the stored study and the spec
    budget: int | None = None   # the stored one
    seconds: float | None = None    # wall time of a complete study, as its summary recorded it


def status(spec: StudySpec, storage: Storage) -> list[Status]:
    return statuses(spec.plan, storage)


def statuses(plan: list[Planned], storage: Storage) -> list[Status]:
    from bbpt.studyspec.baselines import baseline_differences

    out = []
    for p in plan:
        row = storage.get_study(p.name)
        if row is None:
            out.append(Status(p, "new", 0, [], None))
            continue
        if not p.arm.tuned:
            stale = baseline_differences(row.config, p)
        elif row.config.get("optimizer") != p.config.optimizer:
            stale = ["optimizer"]
        else:   # budget is not among these: a complete study resumes with a larger one, or stops early
            stale = StudyConfig.from_dict(row.config).differences(p.config)
        ck = storage.last_checkpoint(row.id)
        out.append(Status(p, row.state, ck.loop_state["calls"] if ck else 0, stale, row.config.get("budget"),
                          (row.summary or {}).get("wall_seconds") if row.state == "complete" else None))
    return out


def time_left(plan: list[Status]) -> list[float | None]:
    """Seconds each study still needs, judged by the complete studies of the same task and arm (0 for a
    complete one, None where there is none to go by).

    The median, not the mean, because one study run while something else shared the cores must not inflate
    every estimate; a partly run study needs the share of its budget it has not spent.
    """
    import statistics

    done: dict[tuple, list[float]] = {}
    for s in plan:
        if s.seconds is not None:
            done.setdefault((s.study.task, s.study.arm.name), []).append(s.seconds)
    out = []
    for s in plan:
        seen = done.get((s.study.task, s.study.arm.name))
        if s.state == "complete":
            out.append(0.0)
        elif not seen:
            out.append(None)
        else:
            budget = s.study.config.budget if s.study.arm.tuned else 0
            left = 1 - min(s.calls / budget, 1) if budget else 1
            out.append(statistics.median(seen) * left)
    return out


def run_spec(spec: StudySpec, *, storage_url: str | None = None, progress: bool = True,
             worker: str | None = None) -> list[str]:
    """Run what is left; returns the names of studies that failed (their error is logged).

    Any number of processes may run the same spec into one storage: each claims one study at a time (see
    :mod:`bbpt.storage.work`), skips those another worker holds, and when only those are left waits for them,
    taking over any whose worker dies, so every process returns when the whole plan is done.
    """
    from bbpt.storage.work import SpecSource, Work

    url = spec.storage_url(storage_url)
    if not storage_url and not spec.storage:
        spec.results_dir.mkdir(parents=True, exist_ok=True)     # the default home of the database
    storage = Storage(url)
    first = status(spec, storage)
    _refuse_stale(first, url)
    work = Work(storage, worker)
    source = SpecSource(spec.name, str(spec.path), spec.source)
    backends: dict[tuple, object] = {}
    failed: list[str] = []
    started = time.time()
    index = {p.name: i for i, p in enumerate(spec.plan, 1)}
    whole = spec.full_plan      # built once: a relative time limit reads other arms' studies from it
    for s in first:
        if _finished(s):
            log.info("[%d/%d] %s: complete, skipped", index[s.study.name], len(spec.plan), s.study.name)
    while True:
        plan = status(spec, storage)
        rows = work.rows([s.study.name for s in plan])
        # Done for this run: complete, or failed since it began (a study that failed before is retried).
        todo = [s for s in plan if not _finished(s) and not (
            s.study.name in failed or (s.study.name in rows and rows[s.study.name].state == "failed"
                                       and (rows[s.study.name].finished_at or 0) >= started))]
        if not todo:
            return failed
        ran = False
        for s in todo:
            tag = f"[{index[s.study.name]}/{len(spec.plan)}] {s.study.name}"
            lease = work.claim(s.study.name, source)
            if lease is None:
                continue
            ran = True
            # Read again under the claim: another worker may have finished it since the plan was read.
            [s] = statuses([s.study], storage)
            if _finished(s):
                lease.release("done")
                continue
            if not _run_claimed(s, storage, lease, backends, spec.runs_dir, progress, tag, whole):
                failed.append(s.study.name)
        if not ran:         # everything left is held by live workers: wait, to take over any that dies
            held = ", ".join(sorted(r.worker for r in rows.values() if r.worker))
            log.info("%d studies left, all held by other workers (%s); waiting", len(todo), held or "-")
            time.sleep(min(work.seconds / 3, 10))


def _finished(s: Status) -> bool:
    return s.state == "complete" and (not s.study.arm.tuned or s.budget == s.study.config.budget)


def _refuse_stale(plan: list[Status], url: str) -> None:
    stale = [s for s in plan if s.stale and s.state != "new"]
    if stale:
        s = stale[0]
        raise StudyError(f"study {s.study.name!r} in {url} was run with settings this spec no longer asks for "
                         f"({', '.join(s.stale)}); delete it to rerun it (bbpt studies delete {s.study.name} "
                         f"--storage {url}), or give the spec a new name or storage"
                         + (f" ({len(stale) - 1} more studies differ)" if len(stale) > 1 else ""))


def _run_claimed(s: Status, storage: Storage, lease, backends: dict, runs_dir: str, progress: bool,
                 tag: str, plan: list[Planned]) -> bool:
    """Run one claimed study to its end under its lease; False if it failed. The lease is released at the
    end whatever happens: done, failed, or pending again (interrupted, or an error that is not the study's).
    ``plan`` is the whole spec's, where a time limit relative to another arm finds that arm's studies."""
    from bbpt.storage.work import LeaseLost

    p, cfg = s.study, s.study.config
    log.info("%s: %s", tag, "starting" if s.state == "new" else f"resuming at call {s.calls}/{cfg.budget}")
    fenced = storage.fenced(lease)
    try:
        with lease.kept():      # from the claim on: a model load can outlast the lease
            key = (cfg.backend, cfg.model, cfg.endpoint, cfg.device, cfg.dtype)
            if key not in backends:     # one model load serves every study that uses it
                from bbpt.session import open_backend

                backends[key] = open_backend(cfg, os.environ.get("BBPT_API_KEY"))
            backend = backends[key]
            if p.relative_seconds is not None:
                try:
                    p = _timed(p, plan, storage, backend)
                except StudyError as e:     # nothing written for it; the spec's other studies go on
                    log.error("%s refused: %s", tag, e)
                    lease.release("failed")
                    return False
            start, before = time.perf_counter(), _scoring_seconds(storage, p)
            try:
                summary = _run_one(p, fenced, backend, runs_dir, progress)
            except (ObjectiveError, OptimizerError) as e:   # a diverged or broken search: record it, do the others
                log.error("%s failed: %s", tag, e)
                fenced.update_study(p.name, state="failed")
                summary = None
            else:
                # Machine and time ride in the summary, so a report rebuilt later from storage alone can state them.
                summary.update(machine=machine(backend), wall_seconds=round(before + time.perf_counter() - start, 2))
                fenced.update_study(p.name, summary=summary)
    except LeaseLost as e:
        log.warning("%s: %s", tag, e)
        return True
    lease.release("done" if summary else "failed")
    if summary is None:
        return False
    log.info("%s: dev %.4f, test %.4f (%s)", tag, summary["dev"], summary["test"], summary["metric"])
    return True


def _timed(p: Planned, plan: list[Planned], storage: Storage, backend) -> Planned:
    """``p`` with max_seconds read from its reference arm's studies on this machine (bbpt.studyspec.timing)."""
    from bbpt.studyspec.timing import resolve

    cfg, seen = resolve(p, plan, storage, machine(backend))
    log.info("%s: max_seconds = %s on this machine: %g x %.1f s (the median of %d %s with %s's settings here) "
             "= %.1f s", p.name, p.relative_seconds, p.relative_seconds.factor,
             cfg.max_seconds / p.relative_seconds.factor, len(seen), "study" if len(seen) == 1 else "studies",
             p.relative_seconds.arm, cfg.max_seconds)
    return replace(p, config=cfg)


def run_worker(storage_url: str | None = None, *, progress: bool = True, until_empty: bool = False,
               worker: str | None = None, poll: float = 10.0) -> list[str]:
    """``bbpt worker``: run queued studies of any spec, one at a time, until stopped (or, with
    ``until_empty``, until no study is left pending); returns the names of those that failed."""
    from bbpt.storage.work import Work

    Storage(storage_url, create=False)      # a mistyped URL fails here instead of creating an empty queue
    storage = Storage(storage_url)          # and an older database is refused with the upgrade command
    work = Work(storage, worker)
    backends: dict[tuple, object] = {}
    failed: list[str] = []
    log.info("worker %s on %s: waiting for work (bbpt study queue SPEC.toml --storage ...)", work.worker,
             storage.url)
    while True:
        got = work.claim_next()
        if got is None:
            if until_empty and not any(r.state == "pending" for r in work.rows().values()):
                return failed
            time.sleep(min(poll, work.seconds / 3))
            continue
        row, lease = got
        try:
            planned, runs_dir, plan = _queued(row)
            [s] = statuses([planned], storage)
            _refuse_stale([s], storage.url)
        except (ConfigError, StudyError) as e:
            log.error("%s cannot run: %s", row.name, e)
            lease.release("failed")
            failed.append(row.name)
            continue
        if _finished(s):
            lease.release("done")
            continue
        if not _run_claimed(s, storage, lease, backends, runs_dir, progress, row.name, plan):
            failed.append(row.name)


def _queued(row) -> tuple[Planned, str, list[Planned]]:
    """The study a work row describes, where its prompt is saved, and the plan it belongs to: one of a spec's
    (rebuilt from the spec's text), or a single `bbpt optimize --queue` study (its config; a plan of one)."""
    from bbpt.studyspec.spec import Arm, spec_from_text

    if row.config is not None:
        cfg = StudyConfig.from_dict(row.config["study"])
        arm = Arm(name="optimize", optimizer=cfg.optimizer, settings={})
        planned = Planned(row.name, cfg.task or str(cfg.data), arm, cfg.seed, cfg)
        return planned, row.config["runs_dir"], [planned]
    spec = spec_from_text(row.spec_text, row.spec_path)
    planned = next((p for p in spec.plan if p.name == row.name), None)
    if planned is None:
        raise StudyError(f"queued study {row.name!r} is not in its spec {row.spec_path!r} any more")
    return planned, spec.runs_dir, spec.plan


def queue_spec(spec: StudySpec, storage_url: str | None = None) -> tuple[int, int]:
    """``bbpt study queue``: put every unfinished study of the spec in the storage's work table for
    ``bbpt worker``s to take; returns (queued, already complete)."""
    from bbpt.storage.work import SpecSource, Work

    storage = Storage(spec.storage_url(storage_url))
    plan = status(spec, storage)
    _refuse_stale(plan, storage.url)
    todo = [s.study.name for s in plan if not _finished(s)]
    added = Work(storage).enqueue(todo, SpecSource(spec.name, str(spec.path), spec.source)) if todo else 0
    return added, len(plan) - len(todo)


def _run_one(p: Planned, storage: Storage, backend, runs_dir: str, progress: bool) -> dict:
    if not p.arm.tuned:
        from bbpt.studyspec.baselines import run_baseline

        return run_baseline(p, storage, backend)
    from bbpt.session import Session
    from bbpt.study import run

    return run(Session(p.config, storage, name=p.name, backend=backend, runs_dir=runs_dir), progress=progress)


def _scoring_seconds(storage: Storage, p: Planned) -> float:
    """Scoring time an interrupted earlier run already spent (its start-up time is not recorded anywhere)."""
    row = storage.get_study(p.name)
    ck = storage.last_checkpoint(row.id) if row is not None else None
    return float(ck.loop_state["seconds"]) if ck else 0.0


def duration(seconds: float) -> str:
    """Seconds as a person reads them: 74.0 s, 12.5 min, 3.8 h."""
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def cpu_name(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name, with its family, model and stepping where Linux gives them: a cloud host may name
    only its vendor ("AMD EPYC"), which covers generations of different speed."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo) as f:
            for ln in f:
                if not ln.strip():
                    break       # the first processor's block is enough
                key, _, value = ln.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    cpu = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        cpu += f" (family {fields['cpu family']}, model {fields['model']}, stepping {fields.get('stepping', '?')})"
    return cpu


def machine(backend) -> str:
    """Where the numbers came from: OS, CPU, core count, and the backend's device and thread count."""
    cpu = cpu_name()
    extra = getattr(backend.info(), "extra", {}) or {}
    parts = [platform.platform(terse=True), cpu, f"{os.cpu_count()} CPUs"]
    if "device" in extra:
        import torch

        parts += [f"device {extra['device']}", f"torch {torch.__version__} with {torch.get_num_threads()} thread(s)"]
    else:
        parts.append(f"remote backend {backend.info().name}")
    return "; ".join(parts)
