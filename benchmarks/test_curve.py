"""What scoring a study's test prompts in one call saves (the selected prompt and, with ``test_curve``, every
prompt dev selected on the way).

A study's test set is scored once per prompt, after the search. Its inputs' keys/values are too big to keep
(Yelp's 500 test reviews: ~5 GB, against the CPU's 1 GB budget), so one prompt at a time runs every input whole,
once per prompt. In one call of k prompts the backend encodes the inputs a group at a time (groups whose
keys/values fit a quarter of the budget), once for all k, and runs only the prompt and the answer cue per
prompt (``HFBackend._grouped_logprobs``); after demonstrations, whose shared head stays kept, the same for
each input's own text after it. Cases: ``--prompts`` infix prompts over the first ``--test`` test inputs, with
the budget set so their own keys/values do not fit (as a study's 500 do not), scored one at a time then in one
call by the same backend. The max |diff| column compares the two paths' log-probs.

    python benchmarks/test_curve.py --json > benchmarks/results/test-curve-2cpu-DATE.json
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import emit, machine

# (task, demonstrations per class): after demonstrations only their shared head is kept for a test set.
CASES = [("yelp", 0), ("agnews", 0), ("mrpc", 0), ("dbpedia", 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=4, help="prompts scored on test (a test curve's length)")
    ap.add_argument("--test", type=int, default=100, help="test inputs (the first N)")
    ap.add_argument("--tokens", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import adapters.hf as hf
    from bbpt.config import StudyConfig
    from bbpt.prompt import PromptInit
    from bbpt.session import load_task_for

    rows = []
    for name, demos in CASES:
        task = load_task_for(StudyConfig(task=name, shots=4 if name == "dbpedia" else 16, seed=0, demos=demos,
                                         optimizer="cma", prompt_position="infix"))
        backend = hf.HFBackend("smollm2-135m", device="cpu")
        backend.set_init(PromptInit("text", args.tokens, text=task.init_text))
        examples = task.test[:args.test]
        d = (np.random.default_rng(0).standard_normal((args.prompts, args.tokens, backend.info().hidden_size))
             * 0.01).astype(np.float32)
        backend.score(d[:1], backend.encode(examples[:1], task.template, task.label_words))    # a token's bytes
        batch = backend.encode(examples, task.template, task.label_words)
        h = hf.common_head(batch.before) if demos else 0
        width = max(len(b) for b in batch.before) - h
        need = len(examples) * width * backend._kv_token_bytes
        # As for a study's 500 test inputs: their own keys/values do not fit (the demonstrations' head does).
        backend.kv_cache_bytes = h * backend._kv_token_bytes + need // 4
        t0 = time.perf_counter()
        apart = np.concatenate([backend.score(d[c:c + 1], batch).logprobs for c in range(args.prompts)])
        one_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        together = backend.score(d, batch).logprobs
        all_s = time.perf_counter() - t0
        rows.append(dict(task=name, demos=demos, examples=batch.n, prompts=args.prompts,
                         kv_mb=round(need / 2**20), budget_mb=round(backend.kv_cache_bytes / 2**20),
                         one_at_a_time_s=round(one_s, 2), one_call_s=round(all_s, 2),
                         speedup=round(one_s / all_s, 2), max_abs_diff=float(np.abs(apart - together).max())))
        del backend
    emit(dict(machine=machine(), prompt_tokens=args.tokens, rows=rows), args.json,
         [("task", "task", "<8"), ("demos", "demos", ">5"), ("examples", "n", ">4"), ("prompts", "k", ">3"),
          ("kv_mb", "own kv MB", ">9"), ("budget_mb", "budget MB", ">9"),
          ("one_at_a_time_s", "one at a time s", ">15.2f"), ("one_call_s", "one call s", ">10.2f"),
          ("speedup", "speedup", ">7.2f"), ("max_abs_diff", "max |diff|", ">10.1e")])


if __name__ == "__main__":
    main()
