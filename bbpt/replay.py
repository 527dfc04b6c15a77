"""Replay a finished study's selection on a larger dev set, without re-running its search.

Selection reads only the prompts the loop scored on dev (the best on train at each dev check), so the search
is the same whatever the dev set; what a larger ``--dev-shots`` changes is which of those prompts is kept.
Since few-shot sampling draws dev after train from each class's shuffled pool, a larger dev set holds the
smaller one and leaves train, the label biases (fitted on train) and test as they were. Replaying therefore
scores the same prompts, with the same biases, on the larger dev set, applies the study's own rule
(:mod:`bbpt.selection`), and scores the new pick on test once. It writes nothing.

Two things are held fixed that a study run with the larger dev set would not hold: ``--demos auto``'s choice
(made on P0's train and dev loss; the stored choice is kept) and, under ``--max-seconds``, the time dev checks
took (they count towards the study's wall time, not its search seconds). The prompts must still have their z:
studies compacted before bbpt kept the z of prompts scored on dev cannot be replayed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from bbpt.errors import StudyError


@dataclass
class _Scored:          # what selection.history reads of an evaluation
    trial_number: int
    metrics: dict


def replay_dev_shots(storage, name: str, dev_shots: int, backend=None) -> dict:
    """The study's stored choice and the choice ``dev_shots`` dev examples per class would have made, with each
    choice's dev and test score (test scored only where the stored evaluations lack it)."""
    from bbpt.config import StudyConfig
    from bbpt.scoring import evaluate, evaluate_many
    from bbpt.selection import history
    from bbpt.session import START, load_task_for, make_prompt_space, open_backend, resolve_init, z_from_bytes

    row = storage.require_study(name)
    if row.state != "complete":
        raise StudyError(f"study {name!r} is {row.state}; replay its selection once it is complete")
    cfg = StudyConfig.from_dict(row.config)
    if cfg.optimizer == "manual" or cfg.space != "projected":
        raise StudyError(f"study {name!r} has no searched soft prompts to reselect")
    evals = storage.evaluations(row.id)
    dev = sorted((e for e in evals if e.split == "dev" and e.trial_number is not None),
                 key=lambda e: (e.calls_at, e.id))
    if not dev:
        raise StudyError(f"study {name!r} scored no prompt on dev")
    own = cfg.dev_shots or cfg.shots
    if dev_shots < own:
        raise StudyError(f"--dev-shots {dev_shots} is fewer than the study's {own}: a "
                         "replay adds dev examples (at the study's own size it reproduces its dev scores)")
    task = load_task_for(replace(cfg, dev_shots=dev_shots))
    if cfg.demos_auto:
        from bbpt import demos_choice

        task = demos_choice.candidates(task, cfg.seed)[(0, demos_choice.AUTO_DEMOS).index(
            demos_choice.stored_choice(evals))]
    backend = backend if backend is not None else open_backend(cfg)
    init = resolve_init(cfg, task)
    backend.set_init(init)
    site = backend.prompt_site() if cfg.depth != "input" else None
    space = make_prompt_space(cfg, task, init, backend.info(), site)

    trials = sorted({e.trial_number for e in dev})
    rows = {n: storage.trial(row.id, n) for n in trials if n != START}      # each read once

    def z_of(n: int) -> np.ndarray:
        if n == START:
            return space.initial()
        if not rows[n].z:
            raise StudyError(f"trial {n} of study {name!r} was compacted before bbpt kept the z of prompts "
                             "scored on dev: its selection cannot be replayed")
        return z_from_bytes(rows[n].z)

    # each prompt's own label bias, fitted on train when it was scored (the loop's dev check used the same);
    # P0's, fitted for its keep_start check, is stored with that evaluation
    biases = [next(e.metrics.get("bias") for e in dev if e.trial_number == n) if n == START
              else rows[n].metrics.get("bias") for n in trials]
    batch = backend.encode(task.dev, task.template, task.label_words)
    y_dev = np.array([e.label for e in task.dev])
    ms, _ = evaluate_many(backend, space.decode(np.stack([z_of(n) for n in trials])), batch, y_dev,
                          task.num_classes, None if all(b is None for b in biases) else biases)
    by_trial = dict(zip(trials, ms))
    metric = task.score_name
    ties = cfg.dev_ties
    stored = history(dev, metric, ties)[-1]      # the study's own choice, by the same rule
    if stored.trial_number != (row.summary or {}).get("selected_trial", stored.trial_number):
        raise StudyError(f"study {name!r} selected trial {row.summary['selected_trial']}, but its dev "
                         f"scores under its rule give {stored.trial_number}: it cannot be replayed faithfully")
    replayed = history([_Scored(e.trial_number, by_trial[e.trial_number]) for e in dev], metric, ties)[-1]
    tests = {e.trial_number: e.metrics for e in evals if e.split == "test" and e.trial_number is not None}
    if replayed.trial_number not in tests:
        n = replayed.trial_number
        test = backend.encode(task.test, task.template, task.label_words)
        tests[n], _, _ = evaluate(backend, space.decode(z_of(n)[None]), test,
                                  np.array([e.label for e in task.test]), task.num_classes,
                                  biases[trials.index(n)])
    small = {e.trial_number: e.metrics[metric] for e in dev}
    return dict(study=name, metric=metric, dev_shots=[own, dev_shots],
                dev_examples=len(task.dev), prompts=len(trials),
                stored=dict(trial=stored.trial_number, dev=stored.metrics[metric],
                            test=tests.get(stored.trial_number, {}).get(metric)),
                replayed=dict(trial=replayed.trial_number, dev=replayed.metrics[metric],
                              dev_small=small[replayed.trial_number], test=tests[replayed.trial_number][metric]))
