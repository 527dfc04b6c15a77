"""The seven Black-Box Tuning tasks, with templates and label words chosen for a causal instruct LM.

Label words begin with a space because the answer follows a colon; each word's first token must differ from
the others' (checked by the backend, which knows the tokenizer). ``init_text`` is the instruction that the
default soft prompt starts from: an informed start matters more than anything else at small budgets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

from bbpt.tasks._base import Task, Template
from bbpt.tasks.loaders import few_shot_split, read_examples


@dataclass(frozen=True)
class TaskSpec:
    folder: str
    template: str
    label_words: tuple[str, ...]
    init_text: str
    metric: str = "accuracy"
    text_pair: bool = False


CLASSIFICATION: dict[str, TaskSpec] = {
    "sst2": TaskSpec("sst2", "Review: {text}\nSentiment (positive or negative):", (" negative", " positive"),
                     "Classify the sentiment of this movie review."),
    "yelp": TaskSpec("yelp", "Review: {text}\nSentiment (positive or negative):", (" negative", " positive"),
                     "Classify the sentiment of this restaurant review."),
    "agnews": TaskSpec("agnews", "Article: {text}\nTopic (World, Sports, Business or Technology):",
                       (" World", " Sports", " Business", " Technology"),
                       "Classify the topic of this news article."),
    "dbpedia": TaskSpec(
        "dbpedia",
        "Text: {text}\nCategory (Company, School, Artist, Athlete, Politician, Transportation, Building, "
        "Nature, Village, Animal, Plant, Album, Film or Book):",
        (" Company", " School", " Artist", " Athlete", " Politician", " Transportation", " Building",
         " Nature", " Village", " Animal", " Plant", " Album", " Film", " Book"),
        "Classify the category of this encyclopedia entry."),
    "mrpc": TaskSpec("mrpc", "Sentence 1: {text}\nSentence 2: {text_pair}\nSame meaning (yes or no)?:",
                     (" no", " yes"), "Do these two sentences mean the same thing?", metric="f1", text_pair=True),
    "rte": TaskSpec("rte", "Premise: {text}\nHypothesis: {text_pair}\nDoes the premise imply the hypothesis "
                           "(yes or no)?:", (" yes", " no"),
                    "Decide whether the premise implies the hypothesis.", text_pair=True),
    "snli": TaskSpec("snli", "Premise: {text}\nHypothesis: {text_pair}\nIs the hypothesis true (yes, maybe or "
                             "no)?:", (" yes", " maybe", " no"),
                     "Decide whether the hypothesis follows from the premise.", text_pair=True),
}


def load_builtin(name: str, *, shots: int, seed: int, template: str | None = None,
                 label_words: list[str] | None = None, max_test: int | None = None,
                 dev_shots: int | None = None) -> Task:
    spec = CLASSIFICATION[name]
    root = resources.files("bbpt.tasks") / "data" / spec.folder
    label_names = json.loads((root / "labels.json").read_text())
    kw = dict(label_names=label_names, text_pair_field="text_pair" if spec.text_pair else None)
    with resources.as_file(root / "train.jsonl.gz") as p:
        pool = read_examples(p, **kw)
    with resources.as_file(root / "test.jsonl.gz") as p:
        test = read_examples(p, **kw)
    train, dev, _ = few_shot_split(pool, shots, seed, len(label_names), dev_shots)
    return Task(name=name, label_names=label_names, label_words=list(label_words or spec.label_words),
                template=Template(template or spec.template), train=train, dev=dev,
                test=test[:max_test] if max_test else test, metric=spec.metric, init_text=spec.init_text)
