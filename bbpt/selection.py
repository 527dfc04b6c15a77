"""Selection on dev, as one rule: which scored prompt the study keeps, and which it had kept at each point.

The study loop applies :func:`improves` each time it scores a candidate on dev; :func:`history` replays the same
rule over a study's stored dev evaluations, so reports can say which prompt a user would have had, had the
search stopped earlier, without a second copy of the rule.
"""

from __future__ import annotations


def improves(score: float, loss: float, best: float | None, best_loss: float, ties: str) -> bool:
    """A dev score beats the kept one (None: nothing kept yet) if it is higher; with ``ties="loss"`` an equal
    score with a lower dev loss also wins. With a few dozen dev examples ties are common (half the suite's
    studies): by default they go to the earlier (already kept) prompt; the dev loss still moves when no answer
    does. Scores may be negative (a generation prompt's dev log-prob per token)."""
    return best is None or score > best or (ties == "loss" and score == best and loss < best_loss)


def history(evals, metric: str, ties: str) -> list:
    """The dev evaluations (of searched trials, in the order the loop made them) at which the kept prompt
    changed: each is the first point where that prompt was the study's choice."""
    best, best_loss, out = None, float("inf"), []
    for e in evals:
        if improves(e.metrics[metric], e.metrics["loss"], best, best_loss, ties):
            best, best_loss = e.metrics[metric], e.metrics["loss"]
            out.append(e)
    return out
