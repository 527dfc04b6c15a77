"""Any optimizer in Nevergrad's registry, e.g. ``nevergrad:NGOpt`` or ``nevergrad:TwoPointsDE``."""

from __future__ import annotations

import numpy as np

from bbpt.errors import ConfigError
from bbpt.optimizers._base import OptimizerSettings, PickledState


def registry_names() -> list[str]:
    import nevergrad as ng

    return sorted(ng.optimizers.registry)


class NevergradOptimizer(PickledState):
    needs_gradient = False

    def __init__(self, name: str, s: OptimizerSettings):
        import nevergrad as ng

        if name not in ng.optimizers.registry:
            close = [n for n in ng.optimizers.registry if n.lower() == name.lower()]
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"unknown Nevergrad optimizer {name!r}; {hint}see `bbpt optimizers` for the list")
        param = ng.p.Array(init=np.asarray(s.x0, dtype=float)).set_mutation(sigma=s.sigma0)
        param.random_state = np.random.RandomState(s.seed)
        self.opt = ng.optimizers.registry[name](parametrization=param, budget=s.budget, num_workers=s.popsize)
        self.popsize = s.popsize
        self.pending: list = []

    def ask(self) -> np.ndarray:
        self.pending = [self.opt.ask() for _ in range(self.popsize)]
        return np.stack([c.value for c in self.pending])

    def tell(self, zs, losses, grads=None) -> None:
        for cand, loss in zip(self.pending, losses):
            self.opt.tell(cand, float(loss))
        self.pending = []

    def stop(self) -> dict:
        return {}
