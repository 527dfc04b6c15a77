"""One call's worth of work: score a population of z on a batch, with gradients when the optimizer asks.

Gradient and derivative-free runs go through the same function, so both are measured on the same axes:
every candidate is one *call* (one forward over the batch); for backprop the backward pass is timed apart.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from bbpt import objective


@dataclass
class Scored:
    losses: np.ndarray            # [pop]
    logprobs: np.ndarray          # [pop, n, C]
    grads: np.ndarray | None      # [pop, dim] when asked for
    tokens: int
    seconds: float                # forward (and backward) wall time
    backward_seconds: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0


def score_population(backend, space, zs: np.ndarray, batch, labels, loss: str, need_grad: bool) -> Scored:
    start = time.perf_counter()
    if not need_grad:
        res = backend.score(space.decode(zs), batch)
        return Scored(losses=objective.loss(res.logprobs, labels, loss), logprobs=res.logprobs, grads=None,
                      tokens=res.tokens, seconds=time.perf_counter() - start, bytes_sent=res.bytes_sent,
                      bytes_received=res.bytes_received)
    import torch

    z = torch.tensor(np.asarray(zs), dtype=torch.float32, requires_grad=True)
    lp, tokens = backend.logprobs_torch(space.decode_torch(z), batch)
    losses = objective.loss(lp, labels, loss)
    forward_done = time.perf_counter()
    losses.sum().backward()
    end = time.perf_counter()
    return Scored(losses=losses.detach().cpu().numpy().astype(np.float64),
                  logprobs=lp.detach().float().cpu().numpy(), grads=z.grad.numpy().astype(np.float64),
                  tokens=tokens, seconds=end - start, backward_seconds=end - forward_done)


def evaluate(backend, deltas: np.ndarray | None, batch, labels, num_classes: int) -> tuple[dict, int, float]:
    """Metrics of one prompt (or of no prompt, ``deltas=None``) on an encoded split."""
    start = time.perf_counter()
    res = backend.score(deltas, batch)
    m = objective.metrics(res.logprobs[0], labels, num_classes)
    m["loss"] = float(objective.loss(res.logprobs[:1], labels)[0])
    return m, res.tokens, time.perf_counter() - start
