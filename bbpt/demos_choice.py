"""``--demos auto``: start from in-context demonstrations only where they help, decided on train before the search.

One demonstration per class lifted the default search by 12-14 points on SST-2 and DBpedia at seed 0 and sank it
by 9 on Yelp (studies/results/bbt_suite_v2.md), and the starting prompt's training loss already told them apart
(gn's first call: SST-2 0.56 with against 0.59 without, Yelp 0.55 against 0.46). So the starting prompt P0 is
scored on the training set under both templates, two calls, and the search starts from the lower loss.

The demonstrations are themselves training examples: scored after them, each sees its own answer in the context.
Both losses are therefore taken over the other training examples only (15 of 16 per class at 16 shots), so the
comparison is not tilted toward the template that shows answers.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from bbpt.scoring import fitness, score_prompts
from bbpt.tasks import Task
from bbpt.tasks.demos import pick_demos, with_demos

AUTO_DEMOS = 1          # demonstrations per class when they are chosen (what bbt_suite_v2 measured)
SPLIT = "start"         # the evaluations' split name for the two scores of P0 that made the choice


@dataclass
class Candidate:
    demos: int          # per class: 0 or AUTO_DEMOS
    task: Task          # the task under this candidate's template
    train: Any          # its training set, encoded (the chosen one's keys/values serve the search)
    metrics: dict       # P0's loss (and accuracy) on the training examples that are not demonstrations
    tokens: int
    seconds: float


def candidates(task: Task, seed: int) -> list[Task]:
    """The two templates ``auto`` chooses between: without demonstrations, then with AUTO_DEMOS per class."""
    return [task, with_demos(task, AUTO_DEMOS, seed)]


def stored_choice(evaluations) -> int | None:
    """The choice a study made before its first generation, read back from its evaluations (None if it has
    not made one yet): a resume starts from the same template without scoring again."""
    rows = [e.metrics for e in evaluations if e.split == SPLIT]
    return min(rows, key=_rank)["demos"] if rows else None


def score_candidates(backend, space, task: Task, seed: int, loss: str, calibration: str) -> list[Candidate]:
    """P0 scored on the whole training set under each template (one call each), its loss read on the examples
    that no candidate shows as a demonstration, with the bias the study would fit on them."""
    shown = {id(ex) for ex in pick_demos(task, AUTO_DEMOS, seed)}
    held = np.array([i for i, ex in enumerate(task.train) if id(ex) not in shown])
    labels = np.array([ex.label for ex in task.train])[held]
    p0 = space.decode(space.initial()[None])
    out = []
    for demos, t in zip((0, AUTO_DEMOS), candidates(task, seed)):
        start = time.perf_counter()
        train = backend.encode(t.train, t.template, t.label_words)
        res = score_prompts(backend, p0, train)
        part = dataclasses.replace(res, logprobs=res.logprobs[:, held],
                                   predicted=None if res.predicted is None else np.asarray(res.predicted)[:, held])
        losses, pred, _ = fitness(part, labels, loss, calibration)
        metrics = dict(demos=demos, loss=float(losses[0]), examples=len(held))
        if pred is not None:
            metrics["accuracy"] = float((pred[0] == labels).mean())
        out.append(Candidate(demos, t, train, metrics, res.tokens, time.perf_counter() - start))
    return out


def _rank(metrics: dict) -> tuple:
    """The lower loss wins; a tie goes to no demonstrations (shorter, cheaper calls)."""
    return metrics["loss"], metrics["demos"]


def pick(cands: list[Candidate]) -> Candidate:
    return min(cands, key=lambda c: _rank(c.metrics))
