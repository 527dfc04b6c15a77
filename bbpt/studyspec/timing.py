"""Time limits relative to another arm on the same machine: ``max_seconds = "2x backprop"`` in a spec's arm.

A comparison such as "the black-box search gets twice backprop's time" is only fair when both arms' seconds
come from one machine. Written as a number, ``max_seconds`` is fixed when the spec is written, so a study that
lands on a slower host (a shared runner, another CPU) gets less than twice that host's backprop time. Written
relative to an arm, it is read when the study starts: ``factor`` × the median search seconds of the complete
studies, on the same task and on this machine's hardware, that ran the named arm's settings (any seed; any arm
of the spec with exactly those settings counts, so an arm that repeats backprop's settings times it on a new
host without touching the committed backprop studies). With none to go by the study is refused, naming the
command that times one; nothing is written for it.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, replace

from bbpt.errors import ConfigError, StudyError

_RULE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*x\s+([A-Za-z0-9][A-Za-z0-9_.-]*)\s*$")


@dataclass(frozen=True)
class RelativeSeconds:
    factor: float
    arm: str

    def __str__(self) -> str:
        return f"{self.factor:g}x {self.arm}"


def parse_relative(value: str, where: str) -> RelativeSeconds:
    m = _RULE.match(value)
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"{where}: max_seconds = {value!r} should be a number of seconds or '<factor>x <arm>', "
                          'e.g. max_seconds = "2x backprop" (twice the time that arm takes on the same machine)')
    return RelativeSeconds(float(m.group(1)), m.group(2))


def hardware(machine: str) -> str:
    """What decides a study's speed in a machine string (runner.machine): CPU, cores, device, threads; the OS
    and kernel build in front vary between hosts of one kind and are left out."""
    return machine.split("; ", 1)[1] if "; " in machine else machine


def _reference(p, plan: list):
    """The reference arm's planned study of ``p``'s task (its first seed: only the seed differs between them)."""
    return next(q for q in plan if q.task == p.task and q.arm.name == p.relative_seconds.arm)


def reference_seconds(p, plan: list, storage, machine: str) -> list[float]:
    """Search seconds of the complete studies that time ``p``'s reference arm on ``p``'s task on this machine."""
    ref = _reference(p, plan)
    out = []
    for q in plan:
        if q.task != p.task or not q.arm.tuned or replace(q.config, seed=ref.seed) != ref.config:
            continue
        row = storage.get_study(q.name)
        summary = (row.summary or {}) if row is not None else {}
        if (row is None or row.state != "complete" or summary.get("calls") != ref.config.budget
                or hardware(summary.get("machine", "")) != hardware(machine)):
            continue
        out.append(float(summary["seconds"]))
    return out


def resolve(p, plan: list, storage, machine: str):
    """``p``'s config with ``max_seconds`` set from its rule on this machine; StudyError if nothing times it."""
    rule = p.relative_seconds
    seen = reference_seconds(p, plan, storage, machine)
    if not seen:
        ref = _reference(p, plan)
        twins = [q.arm.name for q in plan if q.task == p.task and q.seed == ref.seed and q.arm.tuned
                 and q.arm.name != rule.arm and q.config == ref.config]
        how = (f"`bbpt study run SPEC --arms {twins[0]} --tasks {p.task} --seeds {p.seed}`" if twins else
               f"add an arm that repeats {rule.arm!r}'s settings under another name and run it on {p.task} here")
        raise StudyError(f"{p.name}: max_seconds = {str(rule)!r} needs a complete study of {rule.arm!r}'s settings "
                         f"on {p.task} run on this machine ({hardware(machine)}), and there is none; time one first: "
                         f"{how}")
    return replace(p.config, max_seconds=rule.factor * statistics.median(seen)), seen
