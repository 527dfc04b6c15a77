"""CMA-ES through pycma, with Black-Box Tuning's settings (popsize 20, σ0 given, optional box bound)."""

from __future__ import annotations

import numpy as np

from bbpt.optimizers._base import OptimizerSettings, PickledState


class CMAES(PickledState):
    needs_gradient = False

    def __init__(self, s: OptimizerSettings):
        import cma

        # seed NaN: pycma leaves seeding to us, since it only seeds when randn is np.random.randn itself.
        # pycma stops on flat f-values: one generation whose better half ties (tolflatfitness), or a best value
        # unchanged for ~10 generations (tolfun, tolfunhist). When z maps to discrete prompts, many z give one
        # text and such plateaus are the landscape, not convergence (pycma widens σ on them); the budget, not a
        # plateau, decides when a study ends. A soft prompt's loss never ties, so its runs are unchanged.
        opts = {"popsize": s.popsize, "seed": float("nan"), "randn": _global_randn, "verbose": -9,
                "CMA_diagonal": s.diagonal, "maxfevals": float("inf"), "tolflatfitness": 1e9, "tolfun": 0,
                "tolfunhist": 0}
        if s.bound > 0:
            opts["bounds"] = [-s.bound, s.bound]
        # pycma samples from numpy's global generator: keep our own copy of its state so that nothing else
        # in the process can shift the search, and so that checkpoints capture it.
        saved = np.random.get_state()
        np.random.seed(s.seed + 1)
        self.es = cma.CMAEvolutionStrategy(np.asarray(s.x0, dtype=float), s.sigma0, opts)
        self.rng_state = np.random.get_state()
        np.random.set_state(saved)

    def ask(self) -> np.ndarray:
        saved = np.random.get_state()
        np.random.set_state(self.rng_state)
        try:
            return np.asarray(self.es.ask())
        finally:
            self.rng_state = np.random.get_state()
            np.random.set_state(saved)

    def tell(self, zs, losses, grads=None, scores=None) -> None:
        self.es.tell(list(np.asarray(zs)), [float(v) for v in losses])

    def stop(self) -> dict:
        return {k: v for k, v in self.es.stop().items() if k not in ("maxfevals",)}


def _global_randn(*shape):
    """``np.random.randn`` looked up at each call. pycma keeps its sampler in the pickled options, and pickling
    ``np.random.randn`` itself freezes a private copy of the global generator into the checkpoint: a resumed
    search would then draw from that stale copy instead of the state restored around ``ask``."""
    return np.random.randn(*shape)
