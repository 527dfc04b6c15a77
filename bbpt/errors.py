"""One error root for everything bbpt raises on purpose.

Each subclass also inherits the builtin it refines, so ``except ValueError`` in user code keeps working.
Messages name the bad value and say how to fix it; the CLI prints them without a traceback and exits 2.
"""

from __future__ import annotations


class BbptError(Exception):
    """Root of every error bbpt raises deliberately."""


class ConfigError(BbptError, ValueError):
    """A setting, flag or spec value is invalid."""


class DataError(BbptError, ValueError):
    """Task data is malformed: empty file, missing field, unknown label."""


class BackendError(BbptError, RuntimeError):
    """A backend could not score (server down, bad response, model failed to load)."""


class StorageError(BbptError, RuntimeError):
    """The study database cannot be opened, read or written."""


class StudyError(BbptError, ValueError):
    """A study cannot start or resume as asked (unknown name, config mismatch)."""


class OptimizerError(BbptError, RuntimeError):
    """The optimizer library failed to ask or tell (an internal error of Nevergrad or pycma)."""


class ObjectiveError(BbptError, FloatingPointError):
    """A loss is not finite: NaN or inf came back from scoring."""
