"""What holding the model in bfloat16 does to a black-box call: seconds per call and the scores, against float32.

One *call* is one candidate over a task's training batch (the suite's splits: 16 shots per class, DBpedia 4),
scored by the local backend's black-box path (``score``) on the default model. For each task and placement
(infix, bbpt's default for derivative-free search, and prefix), the same population of random offsets (0.5 ×
the embedding std, P0 = the task's instruction) is scored in float32 and in bfloat16, after a warm-up of two
candidates. Reported: seconds per call in each, the ratio, the largest difference in label log-probs, and the
Spearman correlation of the population's losses (1.0: the search sees the same order). The speed depends on
the CPU: with bf16 dot-product instructions (AVX512-BF16, AMX) bf16 is the faster; without them it is
emulated and slower (``cpu_bf16`` says which this machine is).

    python benchmarks/dtype.py --json > benchmarks/results/dtype-2cpu-DATE.json
    python benchmarks/dtype.py --tasks dbpedia --pop 10
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np

TASKS = ["sst2", "yelp", "agnews", "dbpedia", "mrpc", "snli", "rte"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--placements", default="infix,prefix")
    ap.add_argument("--pop", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch
    from scipy.stats import spearmanr

    from adapters.hf import HFBackend
    from bbpt.objective import loss
    from bbpt.prompt import PromptInit
    from bbpt.tasks import load_task

    backends = {dt: HFBackend("smollm2-135m", device="cpu", dtype=dt) for dt in ("float32", "bfloat16")}
    rows = []
    for name in args.tasks.split(","):
        for placement in args.placements.split(","):
            task = load_task(task=name, shots=4 if name == "dbpedia" else 16, seed=0, prompt_position=placement)
            labels = np.array([ex.label for ex in task.train])
            row = dict(task=name, placement=placement, examples=len(labels))
            scores = {}
            for dt, b in backends.items():
                batch = b.encode(task.train, task.template, task.label_words)
                b.set_init(PromptInit("text", 10, text=task.init_text))
                site = b.prompt_site()
                d = (np.random.default_rng(0).standard_normal((args.pop, *site.shape)) * 0.5
                     * float(np.asarray(site.scales)[0])).astype(np.float32)
                b.score(d[:2], batch)          # warm-up: builds the batch's kept keys/values
                t = time.perf_counter()
                scores[dt] = np.asarray(b.score(d, batch).logprobs, dtype=np.float64)
                row[f"{dt}_s_per_call"] = round((time.perf_counter() - t) / args.pop, 4)
            row["speedup"] = round(row["float32_s_per_call"] / row["bfloat16_s_per_call"], 2)
            row["max_abs_logprob_diff"] = round(float(np.abs(scores["float32"] - scores["bfloat16"]).max()), 3)
            row["loss_spearman"] = round(float(spearmanr(loss(scores["float32"], labels),
                                                         loss(scores["bfloat16"], labels))[0]), 4)
            rows.append(row)
            # a line per row as it lands (stderr under --json), so a long run that is cut short still says something
            print(f"{name:>8} {placement:>6}: float32 {row['float32_s_per_call']:.3f} s, bfloat16 "
                  f"{row['bfloat16_s_per_call']:.3f} s ({row['speedup']:.2f}x); max |diff| "
                  f"{row['max_abs_logprob_diff']:.3f}, loss Spearman {row['loss_spearman']:.3f}",
                  file=sys.stderr if args.json else sys.stdout, flush=True)
    out = dict(machine=platform.platform(), processor=platform.processor() or platform.machine(),
               cpu_bf16=bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()),
               threads=torch.get_num_threads(), torch=torch.__version__, pop=args.pop, rows=rows)
    if args.json:
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
