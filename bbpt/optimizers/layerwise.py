"""BBTv2's divide-and-conquer schedule: one CMA-ES per block of z (one per layer of a deep or prefix prompt),
each given one generation in turn while the other blocks stay at their own best so far.

Searching L small spaces in turn instead of one space L times as large is what lets BBTv2 give every layer
d = 500 dimensions; the price is that a block only moves every L-th generation, so one sweep (popsize × L
calls) is the least budget that touches every layer (the session refuses less).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bbpt.optimizers._base import OptimizerSettings, PickledState
from bbpt.optimizers.cma_es import CMAES


class LayerwiseCMAES(PickledState):
    needs_gradient = False

    def __init__(self, s: OptimizerSettings):
        x0 = np.asarray(s.x0, dtype=float)
        self.blocks = list(s.blocks)
        # each block's search is seeded apart, so block b draws the same samples whatever the others do
        self.searches = [CMAES(dataclasses.replace(s, dim=b - a, x0=x0[a:b], seed=s.seed + 1000 * i, blocks=None))
                         for i, (a, b) in enumerate(self.blocks)]
        self.current = x0.copy()
        self.turn = 0

    def ask(self) -> np.ndarray:
        a, b = self.blocks[self.turn]
        cands = self.searches[self.turn].ask()
        zs = np.tile(self.current, (len(cands), 1))
        zs[:, a:b] = cands
        return zs

    def tell(self, zs, losses, grads=None, scores=None) -> None:
        a, b = self.blocks[self.turn]
        search = self.searches[self.turn]
        search.tell(np.asarray(zs)[:, a:b], losses)
        # as BBTv2: the block keeps its own search's best point while the other blocks take their turns
        self.current[a:b] = search.es.result.xbest
        self.turn = (self.turn + 1) % len(self.blocks)

    def stop(self) -> dict:
        return {}
