"""Any optimizer in Nevergrad's registry, e.g. ``nevergrad:NGOpt`` or ``nevergrad:TwoPointsDE``."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from bbpt.errors import ConfigError, OptimizerError
from bbpt.optimizers._base import OptimizerSettings, PickledState


def registry_names() -> list[str]:
    import nevergrad as ng

    return sorted(ng.optimizers.registry)


def check_registered(name: str) -> None:
    import nevergrad as ng

    if name not in ng.optimizers.registry:
        close = [n for n in ng.optimizers.registry if n.lower() == name.lower()]
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown Nevergrad optimizer {name!r}; {hint}see `bbpt optimizers` for the list")


class NevergradOptimizer(PickledState):
    needs_gradient = False

    def __init__(self, name: str, s: OptimizerSettings):
        import nevergrad as ng

        check_registered(name)
        param = ng.p.Array(init=np.asarray(s.x0, dtype=float)).set_mutation(sigma=s.sigma0)
        param.random_state = np.random.RandomState(s.seed)
        self.opt = ng.optimizers.registry[name](parametrization=param, budget=s.budget, num_workers=s.popsize)
        self.name, self.dim, self.popsize = name, s.dim, s.popsize
        self.pending: list = []

    def ask(self) -> np.ndarray:
        with self._library_errors("ask for"):
            self.pending = [self.opt.ask() for _ in range(self.popsize)]
        return np.stack([c.value for c in self.pending])

    def tell(self, zs, losses, grads=None, scores=None) -> None:
        with self._library_errors("tell the losses of"):
            for cand, loss in zip(self.pending, losses):
                self.opt.tell(cand, float(loss))
        self.pending = []

    @contextmanager
    def _library_errors(self, what: str):
        """Nevergrad asks in batches of num_workers = popsize, but the CMA-ES it runs inside NGOpt and others
        keeps its own population, max(popsize, 4 + 3 ln d); when the two differ, a batch straddles two of its
        generations and pycma's two-point step-size adaptation fails ("Mean shift samples are expected but
        missing", nevergrad issues #1508 and #1593). Say so, instead of a traceback from inside the library."""
        try:
            yield
        except (RuntimeError, AssertionError) as e:
            pop = max(self.popsize, 4 + int(3 * np.log(self.dim)))
            raise OptimizerError(
                f"nevergrad:{self.name} failed to {what} {self.popsize} candidates ({str(e).splitlines()[0]}). "
                f"If it runs CMA-ES inside, as NGOpt does at this size, that CMA-ES uses a population of "
                f"max(popsize, 4 + 3 ln d) = {pop} at d = {self.dim}, and a --popsize that differs breaks it: use "
                f"--popsize {pop} with a budget that is a multiple of {pop}, or --optimizer cma") from e

    def stop(self) -> dict:
        return {}
