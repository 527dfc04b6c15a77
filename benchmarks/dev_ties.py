"""What ``--dev-ties loss`` would have selected in committed studies, and what that prompt scores on test.

Issue 16's selection lever, measured offline: for every complete derivative-free study of a results database,
the stored dev checks are replayed under both rules (``bbpt.selection.history``, the rule the loop uses):
``earliest`` (the default: a later prompt must score strictly higher on dev) and ``loss`` (an equal dev score
with a lower dev loss also wins). Where the two choose different trials, the ``loss`` choice is scored on test
once, with its own train-fitted bias, exactly as the study would have scored it (its z is kept by compaction:
every dev-scored trial keeps it). The database is opened read-only; nothing is written to it.

    python benchmarks/dev_ties.py studies/results/bbt_suite_v2.db --json > benchmarks/results/dev_ties-DATE.json
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def replay(storage, study) -> dict:
    """Both rules' choices for one study, from its stored evaluations alone (no model)."""
    from bbpt.selection import history
    from bbpt.config import StudyConfig

    cfg = StudyConfig.from_dict(study.config)
    evals = storage.evaluations(study.id)
    metric = study.summary["metric"]
    dev = sorted((e for e in evals if e.split == "dev" and e.trial_number is not None),
                 key=lambda e: (e.calls_at, e.id))
    test = {e.trial_number: e.metrics[metric] for e in evals if e.split == "test"}
    pick = {rule: history(dev, metric, rule)[-1] for rule in ("earliest", "loss")}
    row = dict(study=study.name, task=study.summary["task"], metric=metric, dev_checks=len(dev),
               ties_at_best=sum(e.metrics[metric] == pick["earliest"].metrics[metric] for e in dev))
    for rule, e in pick.items():
        row[rule] = dict(trial=e.trial_number, calls_at=e.calls_at, dev=e.metrics[metric],
                         dev_loss=round(e.metrics["loss"], 4), test=test.get(e.trial_number))
    return row, cfg


def score_test(storage, study, cfg, trial: int) -> float:
    """The test score of one stored trial's prompt, built the way the study built its prompt space."""
    from bbpt.scoring import evaluate
    from bbpt.session import load_task_for, make_prompt_space, open_backend, resolve_init

    task = load_task_for(cfg)
    backend = open_backend(cfg)
    init = resolve_init(cfg, task)
    backend.set_init(init)
    site = backend.prompt_site() if cfg.depth != "input" else None
    space = make_prompt_space(cfg, task, init, backend.info(), site)
    row = storage.trial(study.id, trial)
    z = np.frombuffer(row.z, dtype="<f4").astype(np.float64)
    batch = backend.encode(task.test, task.template, task.label_words)
    y = np.array([e.label for e in task.test])
    m, _, _ = evaluate(backend, space.decode(z[None]), batch, y, task.num_classes, row.metrics.get("bias"))
    return m[study.summary["metric"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("storage", help="a results database, e.g. studies/results/bbt_suite_v2.db")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON at the end")
    ap.add_argument("--no-score", action="store_true", help="replay the rules only; do not score test")
    args = ap.parse_args()

    from bbpt.storage import Storage

    storage = Storage(f"sqlite:///{args.storage}", create=False, read_only=True)
    rows = []
    for study in storage.list_studies():
        if study.state != "complete" or study.config.get("optimizer") in ("manual", "backprop", "icl"):
            continue
        row, cfg = replay(storage, study)
        same = row["earliest"]["trial"] == row["loss"]["trial"]
        if not same and row["loss"]["test"] is None and not args.no_score:
            row["loss"]["test"] = score_test(storage, study, cfg, row["loss"]["trial"])
        row["same_choice"] = same
        rows.append(row)
        e, lo = row["earliest"], row["loss"]
        print(f"{study.name:48s} earliest {e['test']}  loss {lo['test']}" + ("" if same else
              f"  (trial {e['trial']}@{e['calls_at']} -> {lo['trial']}@{lo['calls_at']})"), file=sys.stderr)
    scored = [r for r in rows if r["earliest"]["test"] is not None and r["loss"]["test"] is not None]
    diff = [r["loss"]["test"] - r["earliest"]["test"] for r in scored]
    out = dict(storage=args.storage, studies=len(rows), changed=sum(not r["same_choice"] for r in rows),
               mean_test_change=float(np.mean(diff)) if diff else None,
               better=sum(d > 0 for d in diff), worse=sum(d < 0 for d in diff), rows=rows)
    print(f"{out['changed']} of {out['studies']} choices change; mean test change {out['mean_test_change']}; "
          f"better {out['better']}, worse {out['worse']}", file=sys.stderr)
    if args.json:
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
