"""Random search: Gaussian samples around z0 with scale σ0. The honest floor every method must beat."""

from __future__ import annotations

import numpy as np

from bbpt.optimizers._base import OptimizerSettings, PickledState


class RandomSearch(PickledState):
    needs_gradient = False

    def __init__(self, s: OptimizerSettings):
        self.x0 = np.asarray(s.x0, dtype=float)
        self.sigma0, self.popsize = s.sigma0, s.popsize
        self.rng = np.random.default_rng(s.seed)

    def ask(self) -> np.ndarray:
        return self.x0 + self.sigma0 * self.rng.standard_normal((self.popsize, self.x0.size))

    def tell(self, zs, losses, grads=None, scores=None) -> None:
        pass

    def stop(self) -> dict:
        return {}
