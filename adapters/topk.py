"""Label log-probs from a server's top-k answer: shared by every backend that reads OpenAI-style ``logprobs``.

A server that returns only the k most likely next tokens says nothing exact about a label outside them. What
it does say: that label's log-prob is below the lowest returned one, and its probability is within the mass
the top-k leave over. :func:`label_floor` is that bound; backends use it (optionally lowered by a margin) for
labels that are missing, and count how often they had to.
"""

from __future__ import annotations

import logging
import math

import numpy as np

log = logging.getLogger(__name__)

# log(1e-300): what "no mass left at all" becomes, so a loss stays finite.
NO_MASS = -690.0


def label_floor(values, margin: float = 0.0) -> float:
    """The most a token absent from a top-k answer can have, ``min(lowest top-k log-prob, log(1 − top-k
    mass))``, minus ``margin`` nats. With ``margin = 0`` it is an upper bound: it ranks the missing label below
    every returned token, as the true value does, but can overstate it."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return NO_MASS
    rest = 1.0 - float(np.exp(v).sum())
    return float(min(v.min(), math.log(rest) if rest > 1e-300 else NO_MASS)) - margin


def merge_duplicates(pairs) -> dict[str, float]:
    """``{token: log-prob}`` from (token, log-prob) pairs; tokens that decode to the same text (different ids)
    have their probabilities added, since a text-only client cannot tell them apart."""
    out: dict[str, float] = {}
    for tok, lp in pairs:
        lp = float(lp)
        out[tok] = float(np.logaddexp(out[tok], lp)) if tok in out else lp
    return out


def warn_missing(missing: np.ndarray, k, source: str) -> None:
    """Say, once per scored population, how many label log-probs had to be set to the floor."""
    if missing.any():
        log.warning("%d of %d label log-probs were outside the server's top-%s and were set to the floor "
                    "(see %s); the loss is approximate for those examples", int(missing.sum()), missing.size,
                    k, source)
