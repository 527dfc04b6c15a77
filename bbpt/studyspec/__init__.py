"""Declarative studies: a TOML spec of tasks × seeds × arms, run into one storage and reported from it.

``load_spec`` parses and validates (no heavy imports); ``run_spec`` and ``write_report`` import the model
and plotting machinery only when called, so ``bbpt --help`` stays instant.
"""

from __future__ import annotations

from bbpt.studyspec.spec import Arm, Planned, StudySpec, load_spec, study_name

__all__ = ["Arm", "Planned", "StudySpec", "load_spec", "run_spec", "status", "study_name", "time_left", "write_report"]


def run_spec(spec: StudySpec, **kw) -> list[str]:
    from bbpt.studyspec.runner import run_spec as _run

    return _run(spec, **kw)


def status(spec: StudySpec, storage):
    from bbpt.studyspec.runner import status as _status

    return _status(spec, storage)


def time_left(plan) -> list:
    from bbpt.studyspec.runner import time_left as _left

    return _left(plan)


def write_report(spec: StudySpec, **kw):
    from bbpt.studyspec.markdown import write_report as _write

    return _write(spec, **kw)
