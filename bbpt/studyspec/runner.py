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
from dataclasses import dataclass

from bbpt.config import StudyConfig
from bbpt.errors import ObjectiveError, OptimizerError, StudyError
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
    from bbpt.studyspec.baselines import baseline_differences

    out = []
    for p in spec.plan:
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


def run_spec(spec: StudySpec, *, storage_url: str | None = None, progress: bool = True) -> list[str]:
    """Run what is left; returns the names of studies that failed (their error is logged)."""
    url = spec.storage_url(storage_url)
    if not storage_url and not spec.storage:
        spec.results_dir.mkdir(parents=True, exist_ok=True)     # the default home of the database
    storage = Storage(url)
    plan = status(spec, storage)
    stale = [s for s in plan if s.stale and s.state != "new"]
    if stale:
        s = stale[0]
        raise StudyError(f"study {s.study.name!r} in {url} was run with settings this spec no longer asks for "
                         f"({', '.join(s.stale)}); delete it to rerun it (bbpt studies delete {s.study.name} "
                         f"--storage {url}), or give the spec a new name or storage"
                         + (f" ({len(stale) - 1} more studies differ)" if len(stale) > 1 else ""))
    backends: dict[tuple, object] = {}
    failed = []
    for i, s in enumerate(plan, 1):
        p, cfg = s.study, s.study.config
        tag = f"[{i}/{len(plan)}] {p.name}"
        if s.state == "complete" and (not p.arm.tuned or s.budget == cfg.budget):
            log.info("%s: complete, skipped", tag)
            continue
        log.info("%s: %s", tag, "starting" if s.state == "new" else f"resuming at call {s.calls}/{cfg.budget}")
        key = (cfg.backend, cfg.model, cfg.endpoint, cfg.device, cfg.dtype)
        if key not in backends:     # one model load serves every study that uses it
            from bbpt.session import open_backend

            backends[key] = open_backend(cfg, os.environ.get("BBPT_API_KEY"))
        backend = backends[key]
        start, before = time.perf_counter(), _scoring_seconds(storage, p)
        try:
            summary = _run_one(p, storage, backend, spec.runs_dir, progress)
        except (ObjectiveError, OptimizerError) as e:   # a diverged or broken search: record it, do the others
            log.error("%s failed: %s", tag, e)
            storage.update_study(p.name, state="failed")
            failed.append(p.name)
            continue
        # Machine and time ride in the summary, so a report rebuilt later from storage alone can state them.
        summary.update(machine=machine(backend), wall_seconds=round(before + time.perf_counter() - start, 2))
        storage.update_study(p.name, summary=summary)
        log.info("%s: dev %.4f, test %.4f (%s)", tag, summary["dev"], summary["test"], summary["metric"])
    return failed


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


def machine(backend) -> str:
    """Where the numbers came from: OS, CPU, core count, and the backend's device and thread count."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    extra = getattr(backend.info(), "extra", {}) or {}
    parts = [platform.platform(terse=True), cpu, f"{os.cpu_count()} CPUs"]
    if "device" in extra:
        import torch

        parts += [f"device {extra['device']}", f"torch {torch.__version__} with {torch.get_num_threads()} thread(s)"]
    else:
        parts.append(f"remote backend {backend.info().name}")
    return "; ".join(parts)
