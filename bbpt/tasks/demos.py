"""Demonstrations: solved train examples written before every input, as text (in-context learning).

The ``icl`` baseline scores the manual prompt after them; ``--demos K`` starts a tuned prompt from the same
place, so a search improves on in-context learning instead of competing with it. They are drawn from the train
split only (the few-shot protocol's labels), so each demonstration is also a training example that sees its own
answer in the context: 1 of the 16 per class at ``--demos 1``.
"""

from __future__ import annotations

import dataclasses
import random

from bbpt.tasks._base import Task, Template


def pick_demos(task: Task, demos_per_class: int, seed: int) -> list:
    """The train examples written as demonstrations, in their order in the prompt: ``demos_per_class`` of each
    class (a generation task: that many in all), drawn with ``seed``."""
    rng = random.Random(seed)
    if task.kind == "generation":
        return rng.sample(task.train, demos_per_class)
    picks = []
    for c in range(task.num_classes):
        picks += rng.sample([ex for ex in task.train if ex.label == c], demos_per_class)
    rng.shuffle(picks)     # classes interleaved at random, so the last demonstration does not hint a label
    return picks


def icl_template(task: Task, demos_per_class: int, seed: int) -> str:
    """The task's template preceded by solved train examples, blank-line separated. A generation task has no
    classes: ``demos_per_class`` is then the number of demonstrations (k shots), each with its answer."""
    picks = pick_demos(task, demos_per_class, seed)
    if task.kind == "generation":
        demos = [task.template.render_plain(ex) + ex.targets[0] for ex in picks]
    else:
        demos = [task.template.render_plain(ex) + task.label_words[ex.label] for ex in picks]
    # Demonstrations are literal text inside a format string: braces in them must not become fields.
    escaped = [d.replace("{", "{{").replace("}", "}}") for d in demos]
    return "\n\n".join(escaped + [task.template.source])


def with_demos(task: Task, demos_per_class: int, seed: int) -> Task:
    """The task with its template preceded by demonstrations (unchanged at 0). The prompt keeps its place in
    the query's template: infix and suffix stay after the input, and a prefix leads the demonstrations too."""
    if demos_per_class <= 0:
        return task
    return dataclasses.replace(task, template=Template(icl_template(task, demos_per_class, seed)))
