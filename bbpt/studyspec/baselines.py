"""The arms that tune nothing, scored on dev and test like any selected prompt.

- ``manual``: the task's template as it is (the bar every tuned prompt has to clear);
- ``icl``: the same template after ``demos_per_class`` solved examples of each class, drawn from the train
  split with the study's seed and shuffled, as text. One per class by default: a 135M model's context is
  long enough for that on every built-in task, and the train split is all a tuned arm may learn from too.

No soft prompt is involved, so both are scored with no prompt offsets (``deltas=None``), exactly as
``Session.finish`` scores its manual-prompt baseline.
"""

from __future__ import annotations

import dataclasses

import numpy as np

import bbpt
from bbpt.config import V1_MEANING
from bbpt.objective import bias_list
from bbpt.scoring import answer_metrics, evaluate, train_bias
from bbpt.session import TEXT_SCORES, load_task_for
from bbpt.storage import Storage
from bbpt.studyspec.spec import BASELINE_SETTINGS, Planned
from bbpt.tasks.builtin import CLASSIFICATION
from bbpt.tasks.demos import with_demos

# Stored-config keys that do not change a baseline's scores (where the model runs, not what it computes).
RESULT_NEUTRAL = frozenset({"device", "endpoint", "template"})


def baseline_config(p: Planned) -> dict:
    """What a baseline study stores as its config: what decides its examples and model, and its arm."""
    d = p.config.to_dict()
    # max_new_tokens only matters where answers are generated; classification baselines stored before it
    # existed keep matching their configs.
    keys = sorted(BASELINE_SETTINGS - ({"max_new_tokens"} if p.task in CLASSIFICATION else set()))
    out = {k: d[k] for k in ("task", "seed", *keys, "version")}
    out.update(optimizer=p.arm.optimizer, budget=0)
    if p.arm.optimizer == "icl":
        out["demos_per_class"] = p.arm.demos_per_class
    return out


def baseline_differences(stored: dict, p: Planned) -> list[str]:
    want = baseline_config(p)
    if stored.get("version", 1) < 2:      # what a key added since meant before it existed
        stored = {**{k: v for k, v in V1_MEANING.items() if k in want}, **stored}
    if stored.get("version", 1) < want["version"]:
        # Version 3 changed only where a soft prompt goes, which no baseline has: older baselines still match.
        stored = {**stored, "version": want["version"]}
    return sorted(k for k in set(stored) | set(want)
                  if k not in RESULT_NEUTRAL and stored.get(k) != want.get(k))


def run_baseline(p: Planned, storage: Storage, backend) -> dict:
    """Score the arm's fixed prompt on dev and test and store it as a complete study with no trials.

    All scoring happens before the first write, and a study left incomplete by a kill between the writes is
    deleted and redone here: it has no trials, so nothing of value is lost."""
    cfg = p.config
    # No soft prompt goes in, so the template is tokenized as written (one piece): a placement would only split
    # its tokenization where an empty prompt sits, and the stored config (which has no placement) stays true.
    task = load_task_for(dataclasses.replace(cfg, prompt_position="prefix", demos=0))
    stored = baseline_config(p)
    note = "manual prompt"
    if p.arm.optimizer == "icl":
        task = with_demos(task, p.arm.demos_per_class, p.seed)
        stored["template"] = task.template.source
        note = f"in-context learning: {p.arm.demos_per_class} train demonstration(s) per class in the prompt"
    evals, by = [], {}
    # The same calibration as the tuned arms: a label bias fitted on this template's train scores.
    bias, fit_tokens = train_bias(backend, None, backend.encode(task.train, task.template, task.label_words),
                                  np.array([e.label for e in task.train]), cfg.calibration)
    for split in ("dev", "test"):
        examples = task.split(split)
        batch = backend.encode(examples, task.template, task.label_words)
        m, tokens, _ = evaluate(backend, None, batch, np.array([e.label for e in examples]), task.num_classes,
                                bias)
        m.update(answer_metrics(backend, None, task, split, cfg.max_new_tokens))
        if bias is not None:
            m["bias"] = bias_list(bias)
        evals.append(dict(trial_number=None, split=split, metrics=m, tokens=tokens + fit_tokens, note=note))
        fit_tokens = 0
        by[split] = m
    metric = task.score_name
    summary = dict(study=p.name, task=task.name, model=cfg.model, backend=cfg.backend, optimizer=p.arm.optimizer,
                   seed=cfg.seed, budget=0, calls=0, tokens=0, seconds=0.0, metric=metric, selected_trial=None,
                   dev=by["dev"][metric], test=by["test"][metric], storage=storage.url)
    for key in TEXT_SCORES:             # generation: the answers' scores, as a tuned study's summary has them
        if key in by["test"]:
            summary.update({f"dev_{key}": by["dev"][key], f"test_{key}": by["test"][key]})
    if storage.get_study(p.name) is not None:
        storage.delete_study(p.name)
    row = storage.create_study(p.name, stored, bbpt_version=bbpt.__version__, model=cfg.model)
    storage.add_evaluations(row.id, evals)
    storage.update_study(p.name, state="complete", summary=summary)
    return summary
