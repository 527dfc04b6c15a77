"""What a call costs where the prompt enters: input layer, deep (BBTv2), prefix (keys/values per layer).

One *call* is one candidate over SST-2's training batch (16 shots per class: 32 examples), scored by the local
backend's black-box path (``score``) on the default model, in one process, one population at a time:

- **input** — P0 + ΔP joined to the input embeddings (the placement's own keys/values reuse);
- **deep** — the same, plus an offset on the hidden states at the prompt's positions before every other layer
  (``--depth deep --layers all``): one pre-hook per layer, the reuse paths unchanged;
- **prefix** — keys and values of m virtual tokens at every layer (``--depth prefix``): each example runs
  whole after its candidate's prefix.

Each depth is scored at both placements where it has one (prefix and infix templates; a prefix has only
prefix), and at infix after one demonstration per class (``--demos 1``, what ``--demos auto`` picks on most
tasks), with the same random offsets, after one warm-up population. The ratio to the input layer's seconds per
call at the same placement is the number issue 18 asks about (goal: deep ≤ 1.3×). ``deep, one row each`` scores
deep with packed segments off (``HFBackend.pack``): how deep calls ran before they were packed (2026-12-06).

    python benchmarks/depth.py                        # population 20, 3 populations per mode
    python benchmarks/depth.py --json > benchmarks/results/depth-2cpu-DATE.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pop", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3, help="populations timed per mode (after one warm-up)")
    ap.add_argument("--tokens", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    from adapters.hf import HFBackend
    from bbpt.prompt import PromptInit
    from bbpt.tasks import load_task
    from bbpt.tasks.demos import with_demos

    backend = HFBackend("smollm2-135m", device="cpu")
    rows = []
    for placement in ("prefix", "infix", "infix + demos"):
        task = load_task(task="sst2", shots=16, seed=0, prompt_position=placement.split()[0])
        if placement.endswith("demos"):
            task = with_demos(task, 1, seed=0)
        batch = backend.encode(task.train, task.template, task.label_words)
        for mode in ("input", "deep", "deep, one row each", "prefix"):
            depth = mode.split(",")[0]
            if depth == "prefix" and placement != "prefix":
                continue
            backend.pack = mode != "deep, one row each"
            backend.set_init(PromptInit("text", args.tokens, text=task.init_text, depth=depth))
            shape = backend.prompt_site().shape
            rng = np.random.default_rng(0)
            scale = np.asarray(backend.prompt_site().scales, dtype=np.float32)
            deltas = (rng.standard_normal((args.pop, *shape)).astype(np.float32) * 0.1
                      * scale.reshape(-1, *([1] * (len(shape) - 1))) if depth != "input"
                      else rng.standard_normal((args.pop, *shape)).astype(np.float32) * 0.1 * scale[0])
            backend.score(deltas, batch)        # warm-up: builds the batch's kept keys/values
            secs = []
            for _ in range(args.reps):
                t = time.perf_counter()
                backend.score(deltas, batch)
                secs.append(time.perf_counter() - t)
            rows.append(dict(placement=placement, depth=mode, blocks=shape[0] if depth != "input" else 1,
                             seconds_per_call=round(float(np.median(secs)) / args.pop, 4)))
    for r in rows:
        base = next(x for x in rows if x["placement"] == r["placement"] and x["depth"] == "input")
        r["vs_input"] = round(r["seconds_per_call"] / base["seconds_per_call"], 3)
    out = dict(machine=platform.platform(), processor=platform.processor(), threads=torch.get_num_threads(),
               torch=torch.__version__, pop=args.pop, reps=args.reps, tokens=args.tokens, rows=rows)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for r in rows:
        print(f"{r['placement']:>13} {r['depth']:>18}: {r['seconds_per_call']:.3f} s/call ({r['vs_input']:.2f}x input)")


if __name__ == "__main__":
    main()
