"""What packing the segments that share a past into one row (``forward_slots``) saves a black-box call.

An infix call scores each (candidate, example) pair after the example's kept keys/values. Run as a batch of
one row per pair, every row copies its past when the cache joins it to the new keys (and grouped-query
attention repeats it per query head): 20 candidates copy each example's text 20 times, and after shared
demonstrations every example copies the whole run of them. Packed, a row holds all candidates of one example
(or, when only the shared head is kept, many examples' segments after it), masked from each other, and the past
is copied once per row. Cases, each scored with packing off then on by the same backend (same kept keys/values):

- a search call on the training batch: ``--pop`` candidates (CMA-ES's default 20), 16 shots per class
  (DBpedia 4), with and without one demonstration per class;
- a test-set scoring after demonstrations where only the shared head fits the cache (``--test`` examples, one
  prompt; the budget is set so, as it is for a study's 500 test examples).

The max |diff| column compares the two paths' log-probs.

    python benchmarks/packing.py --json > benchmarks/results/packing-2cpu-DATE.json
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import emit, machine

CASES = [("yelp", 0, "train"), ("agnews", 0, "train"), ("dbpedia", 1, "train"), ("dbpedia", 1, "test")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pop", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=10)
    ap.add_argument("--test", type=int, default=40, help="test examples in the head-only case")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import adapters.hf as hf
    from bbpt.config import StudyConfig
    from bbpt.prompt import PromptInit
    from bbpt.session import load_task_for

    rows = []
    for name, demos, split in CASES:
        task = load_task_for(StudyConfig(task=name, shots=4 if name == "dbpedia" else 16, seed=0, demos=demos,
                                         optimizer="cma", prompt_position="infix"))
        backend = hf.HFBackend("smollm2-135m", device="cpu")
        backend.set_init(PromptInit("text", args.tokens, text=task.init_text))
        examples = task.train if split == "train" else task.test[:args.test]
        batch = backend.encode(examples, task.template, task.label_words)
        pop = args.pop if split == "train" else 1
        d = (np.random.default_rng(0).standard_normal((pop, args.tokens, backend.info().hidden_size)) * 0.01
             ).astype(np.float32)
        if split == "test":       # as for a study's 500 test examples: the shared head fits, their own tokens not
            h = hf.common_head(batch.before)
            backend.score(d, backend.encode(examples[:1], task.template, task.label_words))  # a token's bytes
            backend.kv_cache_bytes = (h + 2) * backend._kv_token_bytes
        backend.score(d[:1], batch)                  # builds what is kept, outside the timings
        kept = type(batch.kv).__name__ + ("" if not isinstance(batch.kv, hf.SharedKV)
                                          else " + tails" if batch.kv.tail is not None else " (head only)")
        out, secs, forwards = {}, {}, {}
        for pack in (False, True):
            backend.pack = pack
            before = backend.stats["forwards"]
            t0 = time.perf_counter()
            out[pack] = backend.score(d, batch).logprobs
            secs[pack] = time.perf_counter() - t0
            forwards[pack] = backend.stats["forwards"] - before
        rows.append(dict(task=name, demos=demos, split=split, examples=batch.n, candidates=pop, kept=kept,
                         row_each_s=round(secs[False], 2), packed_s=round(secs[True], 2),
                         speedup=round(secs[False] / secs[True], 2), forwards_row_each=forwards[False],
                         forwards_packed=forwards[True], max_abs_diff=float(np.abs(out[True] - out[False]).max())))
        del backend
    emit(dict(machine=machine(), prompt_tokens=args.tokens, rows=rows), args.json,
         [("task", "task", "<8"), ("demos", "demos", ">5"), ("split", "split", "<5"), ("examples", "n", ">4"),
          ("candidates", "pop", ">4"), ("kept", "kept", "<22"), ("row_each_s", "row each s", ">10.2f"),
          ("packed_s", "packed s", ">8.2f"), ("speedup", "speedup", ">7.2f"), ("max_abs_diff", "max |diff|", ">10.1e")])


if __name__ == "__main__":
    main()
