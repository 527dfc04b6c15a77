"""Selection on dev, as one rule: which scored prompt the study keeps, and which it had kept at each point.

The study loop applies :func:`improves` each time it scores a candidate on dev; :func:`history` replays the same
rule over a study's stored dev evaluations, so reports can say which prompt a user would have had, had the
search stopped earlier, without a second copy of the rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations


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


@dataclass(frozen=True)
class OrderCheck:
    """How often dev score and dev loss put two prompts in the order test puts them (see :func:`order_check`)."""
    pairs: int                  # pairs of prompts with different dev scores and different test scores
    score_right: int            # the higher dev score also scored higher on test
    loss_right: int             # the lower dev loss scored higher on test
    disagree: int               # pairs where dev score and dev loss point at different prompts
    loss_right_when_disagree: int


def order_check(studies) -> OrderCheck:
    """The evidence for selecting on dev score rather than dev loss, read from prompts whose test score is
    known: for each study, a list of (dev score, dev loss, test score) of the prompts dev kept in turn (the
    test curve). Within each study, every pair of them is asked which prompt each rule prefers and which one
    test prefers. Pairs tied on dev score or on test say nothing and are skipped. This scores no model and
    selects nothing: reports print it so that a change of rule is decided on measured pairs."""
    n = score_right = loss_right = disagree = loss_wins = 0
    for points in studies:
        for (s1, l1, t1), (s2, l2, t2) in combinations(points, 2):
            if s1 == s2 or t1 == t2:
                continue
            truth, by_score, by_loss = t2 > t1, s2 > s1, l2 < l1
            n += 1
            score_right += by_score == truth
            loss_right += by_loss == truth
            if by_score != by_loss:
                disagree += 1
                loss_wins += by_loss == truth
    return OrderCheck(n, score_right, loss_right, disagree, loss_wins)
