"""What demonstrations (``--demos 1``) cost a black-box call, with their keys/values kept once or per example.

With demonstrations every example's text before the prompt starts with the same long run of tokens (one solved
train example per class: 62 tokens on SST-2, 299 on AG News, 1,564 on DBpedia). The local backend keeps that
run's keys/values once (``SharedKV``) and each example's own tokens after it. Before, it kept one full row per
example, which on AG News and DBpedia went over the CPU's 1 GB cache budget, so those were scored uncached:
every call ran every example's demonstrations again. Modes, each on the training batch (the infix placement,
16 shots per class; DBpedia 4) and on the first ``--test`` test examples (one prompt, as dev/test scoring):

- **kept once** — bbpt's path: the shared head once, each example's own tokens kept beside it (train), or the
  head alone when those do not fit (test: each example's own tokens run with the call);
- **per example** — the path before: every row kept whole if that fits the budget, else uncached (whole
  sequences every call, the reference path);
- **uncached** — with ``--uncached`` only: whole sequences every call, whatever fits.

*manual s* times the manual baseline (no prompt) on the same test examples: since 2026-12-05 it reuses the kept
head like a prompt does (before, it always ran whole sequences); ``uncached`` mode shows the old cost.

The checksum column (the sum of the training batch's log-probs) shows every mode scores the same.

    python benchmarks/demos.py --json > benchmarks/results/demos-2cpu-DATE.json
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import emit, machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["sst2", "agnews", "dbpedia"])
    ap.add_argument("--pop", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=10)
    ap.add_argument("--test", type=int, default=100, help="test examples scored once per mode")
    ap.add_argument("--uncached", action="store_true", help="also time the uncached path on every task")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import adapters.hf as hf
    from bbpt.config import StudyConfig
    from bbpt.prompt import PromptInit
    from bbpt.session import load_task_for

    rows = []
    default_min = hf.SHARED_HEAD_MIN
    for name in args.tasks:
        task = load_task_for(StudyConfig(task=name, shots=4 if name == "dbpedia" else 16, seed=0, demos=1,
                                         optimizer="cma", prompt_position="infix"))
        for mode in ("kept once", "per example", "uncached")[:3 if args.uncached else 2]:
            backend = hf.HFBackend("smollm2-135m", device="cpu", reuse_kv=mode != "uncached")
            hf.SHARED_HEAD_MIN = default_min if mode == "kept once" else 10**9
            try:
                backend.set_init(PromptInit("text", args.tokens, text=task.init_text))
                rng = np.random.default_rng(0)
                d = (rng.standard_normal((args.pop, args.tokens, backend.info().hidden_size)) * 0.01
                     ).astype(np.float32)
                train = backend.encode(task.train, task.template, task.label_words)
                t0 = time.perf_counter()
                backend.score(d[:1], train)          # first call: builds what is kept
                first = time.perf_counter() - t0
                t0 = time.perf_counter()
                ref = backend.score(d, train).logprobs
                per_call = (time.perf_counter() - t0) / args.pop
                kept_mb = 0.0 if train.kv is None else train.kv.nbytes / 2**20
                test = backend.encode(task.test[:args.test], task.template, task.label_words)
                t0 = time.perf_counter()
                backend.score(d[:1], test)
                test_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                manual = backend.score(None, test).logprobs      # the manual baseline: no prompt at all
                manual_s = time.perf_counter() - t0
                h = hf.common_head(train.before)
                rows.append(dict(task=name, mode=mode, examples=train.n, shared_head_tokens=h,
                                 mean_before_tokens=round(float(np.mean([len(b) for b in train.before])), 1),
                                 first_call_s=round(first, 2), seconds_per_call=round(per_call, 3),
                                 kept_train_mb=round(kept_mb, 1), test_examples=test.n,
                                 test_scoring_s=round(test_s, 2), manual_test_s=round(manual_s, 2),
                                 train_logprob_checksum=round(float(ref.sum()), 2),
                                 manual_test_checksum=round(float(manual.sum()), 2)))
            finally:
                hf.SHARED_HEAD_MIN = default_min
            del backend
    emit(dict(machine=machine(), population=args.pop, prompt_tokens=args.tokens, rows=rows), args.json,
         [("task", "task", "<8"), ("mode", "mode", "<12"), ("shared_head_tokens", "head", ">5"),
          ("first_call_s", "1st s", ">7.2f"), ("seconds_per_call", "s/call", ">7.3f"),
          ("kept_train_mb", "kept MB", ">8.0f"), ("test_scoring_s", "test s", ">7.2f"),
          ("train_logprob_checksum", "checksum", ">10.2f")])

if __name__ == "__main__":
    main()
