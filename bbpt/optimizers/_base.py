"""The Optimizer protocol: ask/tell over vectors z, for derivative-free and gradient methods alike.

``ask()`` returns the candidates to score next (``[k, dim]``); ``tell(zs, losses, grads, scores)`` reports
their losses (and gradients, for optimizers with ``needs_gradient``; and the label scores ``[k, n, C]`` that
gave the losses, which an optimizer may read, as ``gn`` does). ``state()`` serialises everything needed to
continue the same search, random generators included, so a resumed study asks exactly what an uninterrupted
one would have asked.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass
class OptimizerSettings:
    dim: int
    x0: np.ndarray
    seed: int
    budget: int                 # in calls: candidates scored
    popsize: int = 20
    sigma0: float = 1.0
    lr: float = 0.01
    diagonal: bool = False      # CMA-ES: separable covariance (linear cost in d)
    bound: float = 0.0          # CMA-ES: box bound on each z_i (0 = none)
    labels: np.ndarray | None = None    # the training labels (optimizers that model the scores: gn)
    calibration: str = "none"           # how the loss treats the scores: "bias" fits a label bias first
    blocks: list[tuple[int, int]] | None = None     # z's blocks (start, end): set, CMA-ES searches them in turn


@runtime_checkable
class Optimizer(Protocol):
    needs_gradient: bool

    def ask(self) -> np.ndarray: ...

    def tell(self, zs: np.ndarray, losses: np.ndarray, grads: np.ndarray | None = None,
             scores: np.ndarray | None = None) -> None: ...

    def stop(self) -> dict: ...

    def state(self) -> bytes: ...

    def load_state(self, blob: bytes) -> None: ...


class PickledState:
    """State by pickling the instance dict; fine because checkpoints are written and read only by bbpt."""

    def state(self) -> bytes:
        return pickle.dumps(self.__dict__)

    def load_state(self, blob: bytes) -> None:
        self.__dict__.update(pickle.loads(blob))  # noqa: S301 - our own checkpoint, never client bytes
