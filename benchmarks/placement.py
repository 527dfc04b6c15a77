"""What a black-box call costs by where the prompt sits: infix (before the answer cue) or suffix (after it).

One *call* is one candidate over a task's training batch (16 shots per class; DBpedia 4), scored by the local
backend's black-box path on the default model, in one process, after a warm-up that builds the batch's kept
keys/values (encoded once per study). Modes:

- **infix** — ``Article: {text}\\n<prompt>Topic (...):``: each call recomputes the prompt and the answer cue;
- **suffix** — ``Article: {text}\\nTopic (...):<prompt>``: each call recomputes only the m prompt tokens.

(Commit 5f37ccd also measured candidates packed into one row per example over a shared past, with a
block-diagonal mask: no faster where it mattered, and reverted; its numbers are in
benchmarks/results/placement-2cpu-2026-12-02.json.)

    python benchmarks/placement.py --json > benchmarks/results/placement-2cpu-DATE.json
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import emit, machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["sst2", "yelp", "agnews", "dbpedia"])
    ap.add_argument("--pop", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from adapters.hf import HFBackend
    from bbpt.prompt import PromptInit
    from bbpt.tasks import load_task

    backend = HFBackend("smollm2-135m", device="cpu")
    rows = []
    for name in args.tasks:
        for placement in ("infix", "suffix"):
            task = load_task(task=name, shots=4 if name == "dbpedia" else 16, seed=0, prompt_position=placement)
            batch = backend.encode(task.train, task.template, task.label_words)
            backend.set_init(PromptInit("text", args.tokens, text=task.init_text))
            rng = np.random.default_rng(0)
            d = (rng.standard_normal((args.pop, args.tokens, backend.info().hidden_size)) * 0.01).astype(np.float32)
            backend.score(d[:2], batch)         # warm-up: keys/values of the inputs
            t0 = time.perf_counter()
            backend.score(d, batch)
            rows.append(dict(task=name, placement=placement, examples=batch.n,
                             seconds_per_call=round((time.perf_counter() - t0) / args.pop, 3),
                             mean_past_tokens=round(float(np.mean([len(b) for b in batch.before])), 1),
                             new_tokens_per_row=args.tokens + round(float(np.mean([len(a) for a in batch.after])), 1)))
    emit(dict(machine=machine(), population=args.pop, prompt_tokens=args.tokens, rows=rows), args.json,
         [("task", "task", "<8"), ("placement", "placement", "<9"), ("seconds_per_call", "s/call", ">7.3f"),
          ("mean_past_tokens", "past", ">6.0f"), ("new_tokens_per_row", "new", ">5.0f")])

if __name__ == "__main__":
    main()
