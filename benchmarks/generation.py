"""Generation speed with a soft prompt: ``bbpt generate`` (HFBackend.generate) against PEFT's ``generate``, on
the same prompt and the same E2E test inputs, greedy, on the default model.

Modes, each over the same ``--inputs`` MRs with the same prompt (P0 = e2e's instruction text plus a fixed
random offset, so no tuning run is needed: speed does not depend on the values):

- **bbpt, batched** — what ``bbpt generate`` and a study's final evaluation run: rows left-padded with explicit
  positions, keys/values kept between steps, ``--batch`` rows at a time;
- **bbpt, one at a time** — the same, one input per call;
- **peer: PEFT, cached** — ``PeftModel.generate`` as a user calls it (prompt tuning, ``use_cache`` default);
- **peer: PEFT, use_cache=False** — the same with the whole sequence recomputed every step;
- **transformers generate on inputs_embeds** — ``model.generate(inputs_embeds=[P; x])`` one input at a time,
  the base model's own greedy decoding with the prompt joined by hand (the reference for identical output).

For each: new tokens per second (new tokens over wall time) and whether every output's token ids equal
bbpt's. Stops at the end-of-sequence token or ``--max-new-tokens``.

    python benchmarks/generation.py                   # 32 inputs, 40 new tokens at most
    python benchmarks/generation.py --quick --json    # 4 inputs, a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="4 inputs, 12 new tokens")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    if args.quick:
        args.inputs, args.max_new_tokens = 4, 12

    import numpy as np
    import torch
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from adapters.default_model import resolve_model
    from adapters.hf import HFBackend
    from bbpt.config import StudyConfig
    from bbpt.prompt import PromptInit
    from bbpt.session import resolve_init
    from bbpt.tasks import load_task

    torch.set_num_threads(args.threads)
    task = load_task(task="e2e", shots=4, seed=0, max_test=args.inputs)
    ours = HFBackend("smollm2-135m", device="cpu")
    ours.set_init(resolve_init(StudyConfig(task="e2e"), task))
    m, width = ours.p0.shape
    prompt = (ours.p0.numpy() + np.random.default_rng(0).standard_normal((m, width)).astype(np.float32) * 0.02)
    ours.set_init(PromptInit("zeros", m))
    tok, eos, n_new = ours.tokenizer, ours.tokenizer.eos_token_id, args.max_new_tokens
    texts = [task.template.render_plain(ex) for ex in task.test]

    def timed(fn):
        start = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - start

    results = {}
    ref, secs = timed(lambda: [r["ids"] for r in ours.generate_rows(prompt, task.test, task.template,
                                                                     max_new_tokens=n_new, batch_size=args.batch)])
    results["bbpt, batched"] = (ref, secs)
    results["bbpt, one at a time"] = timed(lambda: [ours.generate_rows(prompt, [ex], task.template,
                                                                        max_new_tokens=n_new)[0]["ids"]
                                                     for ex in task.test])

    base = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m")).eval()
    peft_model = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=m)).eval()
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(torch.from_numpy(prompt))

    def peer(use_cache: bool):
        outs = []
        with torch.no_grad():
            for t in texts:
                enc = tok(t, return_tensors="pt")
                o = peft_model.generate(**enc, max_new_tokens=n_new, do_sample=False, eos_token_id=eos,
                                        pad_token_id=eos, use_cache=use_cache)
                outs.append([i for i in o[0, enc["input_ids"].shape[1]:].tolist() if i != eos])
        return outs

    results["peer: PEFT, cached"] = timed(lambda: peer(True))
    results["peer: PEFT, use_cache=False"] = timed(lambda: peer(False))

    def embeds_generate():
        outs = []
        p = torch.from_numpy(prompt)[None]
        with torch.no_grad():
            for t in texts:
                ids = tok(t, return_tensors="pt")["input_ids"]
                x = torch.cat([p, base.get_input_embeddings()(ids)], 1)
                o = base.generate(inputs_embeds=x, attention_mask=torch.ones(1, x.shape[1], dtype=torch.long),
                                  max_new_tokens=n_new, do_sample=False, eos_token_id=eos, pad_token_id=eos)
                outs.append([i for i in o[0].tolist() if i != eos])
        return outs

    results["transformers generate on inputs_embeds"] = timed(embeds_generate)

    rows = []
    for name, (outs, secs) in results.items():
        new = sum(len(o) for o in outs)
        rows.append(dict(mode=name, seconds=round(secs, 2), new_tokens=new, tokens_per_s=round(new / secs, 1),
                         identical_to_bbpt=outs == ref, identical_rows=sum(a == b for a, b in zip(outs, ref))))
    report = dict(machine=dict(platform=platform.platform(), processor=platform.processor() or "unknown",
                               cpus=os.cpu_count(), threads=args.threads, torch=torch.__version__),
                  inputs=args.inputs, max_new_tokens=n_new, batch=args.batch, prompt_tokens=m, modes=rows)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{'mode':42}{'s':>8}{'new tok':>9}{'tok/s':>8}  identical to bbpt")
        for r in rows:
            print(f"{r['mode']:42}{r['seconds']:>8}{r['new_tokens']:>9}{r['tokens_per_s']:>8}  "
                  f"{r['identical_rows']}/{args.inputs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
