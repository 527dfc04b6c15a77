"""Black-box scoring speed: PEFT's prompt-tuning forward against bbpt's local backend, step by step, in one run.

One *call* is one candidate prompt over the training batch (SST-2, 16 shots per class: 32 examples). For each
prompt length m, the same population of candidates (P0 = the task's instruction text, plus BBT-style random
projections of z ~ N(0, I)) is scored by:

- **peer** — what a user writes today: ``get_peft_model(model, PromptTuningConfig(...))``, the candidate copied
  into the prompt embedding, one left-padded forward over the 32 texts, ``logits[:, -1]``;
- **exact, one at a time** — bbpt's reference path (``reuse_kv=False``): position ids so padding changes no
  score, only the last position through the LM head, one candidate per ``score``;
- **batched population** — the same, the whole population in one ``score`` (pairs sorted by length into
  forwards of ≤ ``max_batch_tokens``);
- **prefix, kv reused** — the default path for prefix prompts: the prompt's keys/values computed once per
  candidate and shared by its 32 examples;
- **infix, kv reused** — ``--prompt-position infix`` (``Review: {text}\\n{prompt}Sentiment ...:``): each input
  is encoded once per study (``setup_s``), a call computes only the prompt and the answer cue.

Also measured: a large float32 GEMM through torch (the machine's dense rate), the FLOPs each mode really
executes (2 × non-embedding parameters per computed token, plus 2 × V × D per position that reaches the LM
head — attention's own products are left out, under 2 % at these lengths; padding is not counted as work, and
``padded_tokens_per_call`` shows how much of it each mode computes), efficiency = achieved / GEMM rate
(also per CPU-second, ``efficiency_cpu``, steadier when other processes share the cores),
RSS (peak, and growth over ``--calls`` calls of each kv-reusing mode), and ``max_abs_diff``: the largest
difference between bbpt's label log-probs and the reference's on identical inputs (the peer run one
unpadded example at a time for prefix, which is how its scores are exact; a plain unpadded forward with the
prompt in the middle for infix, which PEFT cannot place). ``peer_padded_max_abs_diff`` shows what the peer's
own padded batch gets wrong.

    python benchmarks/scoring.py                 # population 20, m = 10 and 50, 1,000 calls for memory
    python benchmarks/scoring.py --quick --json  # a smoke run in a few minutes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

import numpy as np

INIT_TEXT = "Classify the sentiment of this movie review."


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # KiB on Linux


def matmul_gflops(n: int = 2048, repeats: int = 5) -> tuple[float, float]:
    """Best of ``repeats`` float32 n×n GEMMs: the dense rate every forward is measured against, per second of
    wall time and per CPU-second (all threads; what efficiency on a shared machine is judged by)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    wall = cpu = float("inf")
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        torch.mm(a, b)
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return 2 * n**3 / wall / 1e9, 2 * n**3 / cpu / 1e9


class Flops:
    """FLOPs of a forward from what it computes: tokens through the body, positions through the LM head."""

    def __init__(self, model):
        emb = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        total = sum(p.numel() for p in model.parameters())
        tied = head.data_ptr() == emb.data_ptr()
        self.body = 2 * (total - emb.numel() - (0 if tied else head.numel()))
        self.head = 2 * head.numel()

    def __call__(self, tokens: int, head_positions: int) -> float:
        return tokens * self.body + head_positions * self.head


class Peer:
    """PEFT's prompt tuning used the plain way: one candidate in the prompt encoder, one padded forward."""

    def __init__(self, model_dir: str, m: int, texts: list[str], label_ids: list[int]):
        import torch
        from peft import PromptTuningConfig, TaskType, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        tok = AutoTokenizer.from_pretrained(model_dir)
        tok.padding_side = "left"           # the last position must be each text's last token
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.model = get_peft_model(base, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=m))
        self.model.eval()
        self.prompt = self.model.prompt_encoder["default"].embedding.weight
        self.inputs = tok(texts, padding=True, return_tensors="pt")
        self.singles = [tok(t, return_tensors="pt") for t in texts]
        self.label_ids = label_ids
        self.real_tokens = int(self.inputs["attention_mask"].sum()) + m * len(texts)
        self.padded_tokens = self.inputs["attention_mask"].numel() + m * len(texts)

    def _set(self, p) -> None:
        with self.torch.no_grad():
            self.prompt.copy_(self.torch.as_tensor(p))

    def score(self, p):
        """``[n, C]`` label log-probs from one padded forward, full-vocabulary logits everywhere."""
        self._set(p)
        with self.torch.inference_mode():
            logits = self.model(**self.inputs).logits[:, -1]
        return self.torch.log_softmax(logits.float(), -1)[:, self.label_ids].numpy()

    def score_unpadded(self, p):
        """The same, one example per forward: no padding, so the exact reference."""
        self._set(p)
        rows = []
        with self.torch.inference_mode():
            for x in self.singles:
                rows.append(self.torch.log_softmax(self.model(**x).logits[0, -1].float(), -1)[self.label_ids])
        return self.torch.stack(rows).numpy()


def plain_reference(backend, prompts, batch):
    """Each (candidate, example) as one unpadded inputs_embeds forward of the whole model: before · P · after."""
    import torch

    out = np.zeros((len(prompts), batch.n, len(batch.label_ids)), np.float32)
    emb = backend.embedding
    with torch.inference_mode():
        for c, p in enumerate(prompts):
            for j, (b, a) in enumerate(zip(batch.before, batch.after)):
                x = torch.cat([emb(torch.tensor(b, dtype=torch.long)), torch.as_tensor(p),
                               emb(torch.tensor(a, dtype=torch.long))])
                lp = torch.log_softmax(backend.model(inputs_embeds=x[None]).logits[0, -1].float(), -1)
                out[c, j] = lp[batch.label_ids].numpy()
    return out


def timed_calls(fn, repeats: int) -> tuple[float, float]:
    """Median wall and CPU (all threads) seconds of ``fn`` over ``repeats`` runs. On a shared machine wall time
    swings with the neighbours' load; CPU time swings much less, so ratios are also given from it."""
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return float(np.median(wall)), float(np.median(cpu))


def run(args) -> dict:
    import torch

    from adapters.default_model import resolve_model
    from adapters.hf import HFBackend
    from bbpt.config import StudyConfig
    from bbpt.prompt import PromptInit, ProjectedSpace
    from bbpt.tasks import load_task

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model)
    alpha = StudyConfig.__dataclass_fields__["alpha"].default     # the step scale a default study uses
    task = load_task(task="sst2", shots=16, seed=args.seed)
    examples = task.train
    texts = [task.template.render_plain(e) for e in examples]
    infix_tmpl = task.template.at("infix")
    backend = HFBackend(args.model, device="cpu", max_batch_tokens=args.max_batch_tokens)
    flops = Flops(backend.model)
    gemm, gemm_cpu = matmul_gflops(repeats=5 if args.quick else 10)
    n, pop = len(examples), args.population
    result = dict(
        machine=dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
                     torch_threads=torch.get_num_threads(), torch=torch.__version__, python=platform.python_version(),
                     note=args.note),
        command=" ".join(["python", "benchmarks/scoring.py", *sys.argv[1:]]),
        model=args.model, task="sst2", examples=n, population=pop, matmul_gflops=round(gemm, 1),
        matmul_gflops_per_cpu_s=round(gemm_cpu, 1),
        flops_per_token=flops.body, lm_head_flops_per_position=flops.head, modes=[])
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if not args.silent else (lambda *a: None)
    log(f"GEMM: {gemm:.1f} GFLOP/s on {torch.get_num_threads()} threads; {n} examples, population {pop}")

    for m in args.tokens:
        init = PromptInit("text", m, text=INIT_TEXT)
        backend.set_init(init)
        space = ProjectedSpace(m, backend.info().hidden_size, 500, seed=args.seed,
                               embed_std=backend.info().embed_std, alpha=alpha)
        zs = np.random.default_rng(args.seed).standard_normal((pop, 500))
        deltas = space.decode(zs)
        prompts = np.stack([backend.prompt_matrix(d) for d in deltas])
        prefix = backend.encode(examples, task.template, task.label_words)
        infix = backend.encode(examples, infix_tmpl, task.label_words)
        peer = Peer(model_dir, m, texts, prefix.label_ids)
        real_tokens = sum(len(b) + m + len(a) for b, a in zip(prefix.before, prefix.after))

        # -- the peer
        peer.score(prompts[0])
        peer_s, peer_cpu = (x / pop for x in timed_calls(lambda: [peer.score(p) for p in prompts], args.repeats))
        peer_padded = np.stack([peer.score(p) for p in prompts[: args.diff_candidates]])
        peer_exact = np.stack([peer.score_unpadded(p) for p in prompts[: args.diff_candidates]])
        peer_rate = n / peer_s
        rows = [dict(mode="peer (PEFT, padded batch)", m=m, placement="prefix", s_per_call=peer_s,
                     cpu_s_per_call=peer_cpu,
                     examples_per_s=peer_rate, tokens_per_s=real_tokens / peer_s,
                     computed_tokens_per_call=peer.real_tokens, padded_tokens_per_call=peer.padded_tokens,
                     gflop_per_call=flops(peer.real_tokens, peer.real_tokens) / 1e9)]
        del peer

        # -- bbpt, step by step
        def measure(name, batch, reuse, one_at_a_time, placement):
            backend.reuse_kv = reuse
            setup = 0.0
            if reuse:                  # the first call builds what later calls reuse: timed apart
                batch.kv = None
                t = time.perf_counter()
                backend.score(deltas[:1], batch)
                setup = time.perf_counter() - t
            else:
                backend.score(deltas[:1], batch)
            before = dict(backend.stats)
            if one_at_a_time:
                s, cpu = timed_calls(lambda: [backend.score(d[None], batch) for d in deltas], args.repeats)
            else:
                s, cpu = timed_calls(lambda: backend.score(deltas, batch), args.repeats)
            s, cpu = s / pop, cpu / pop
            computed = (backend.stats["computed_tokens"] - before["computed_tokens"]) / (args.repeats * pop)
            padded = (backend.stats["padded_tokens"] - before["padded_tokens"]) / (args.repeats * pop)
            got = backend.score(deltas[: args.diff_candidates], batch).logprobs
            return dict(mode=name, m=m, placement=placement, s_per_call=s, cpu_s_per_call=cpu, examples_per_s=n / s,
                        tokens_per_s=real_tokens / s, computed_tokens_per_call=computed, padded_tokens_per_call=padded,
                        gflop_per_call=flops(computed, n) / 1e9, setup_s=setup, logprobs=got)

        steps = [("exact, one at a time", prefix, False, True, "prefix"),
                 ("batched population", prefix, False, False, "prefix"),
                 ("prefix, kv reused", prefix, True, False, "prefix"),
                 ("infix, kv reused", infix, True, False, "infix")]
        for name, batch, reuse, single, placement in steps:
            if args.quick and single and m != args.tokens[0]:
                continue
            rows.append(measure(name, batch, reuse, single, placement))
            log(f"m={m} {name}: {rows[-1]['s_per_call']:.3f} s/call")
        infix_ref = plain_reference(backend, prompts[: args.diff_candidates], infix)

        for r in rows:
            lp = r.pop("logprobs", None)
            if lp is not None:
                ref = peer_exact if r["placement"] == "prefix" else infix_ref
                r["max_abs_diff"] = float(np.abs(lp - ref).max())
                r["reference"] = ("PEFT forward, one unpadded example at a time" if r["placement"] == "prefix"
                                  else "plain unpadded inputs_embeds forward (PEFT has no infix)")
            else:
                r["max_abs_diff"] = float(np.abs(peer_padded - peer_exact).max())
                r["reference"] = "PEFT forward, one unpadded example at a time (what padding costs the peer)"
            achieved = r["gflop_per_call"] / r["s_per_call"]
            r.update(peer_examples_per_s=peer_rate, bbpt_examples_per_s=r["examples_per_s"],
                     speedup=r["examples_per_s"] / peer_rate, speedup_cpu=peer_cpu / r["cpu_s_per_call"],
                     matmul_gflops=gemm, achieved_gflops=achieved, efficiency=achieved / gemm,
                     efficiency_cpu=r["gflop_per_call"] / r["cpu_s_per_call"] / gemm_cpu,
                     lm_head_share=flops(0, n) / 1e9 / r["gflop_per_call"], peak_rss_mb=peak_rss_mb())
        rows[0]["peer_padded_max_abs_diff"] = rows[0]["max_abs_diff"]
        result["modes"] += rows

    # -- memory over many calls, in the modes that keep caches between calls
    m = args.tokens[0]
    backend.set_init(PromptInit("text", m, text=INIT_TEXT))
    backend.reuse_kv = True
    space = ProjectedSpace(m, backend.info().hidden_size, 500, seed=args.seed, embed_std=backend.info().embed_std,
                           alpha=alpha)
    rng = np.random.default_rng(args.seed + 1)
    for placement, tmpl in (("prefix", task.template), ("infix", infix_tmpl)):
        batch = backend.encode(examples, tmpl, task.label_words)
        backend.score(space.decode(rng.standard_normal((pop, 500))), batch)
        start_rss, calls = rss_mb(), pop
        t = time.perf_counter()
        while calls < args.calls:
            k = min(pop, args.calls - calls)
            backend.score(space.decode(rng.standard_normal((k, 500))), batch)
            calls += k
        result.setdefault("memory", []).append(dict(
            placement=placement, m=m, calls=calls, rss_after_first_generation_mb=start_rss,
            rss_growth_mb=rss_mb() - start_rss, peak_rss_mb=peak_rss_mb(),
            kept_kv_mb=sum(b for _, b in backend._kv_kept.values()) / 2**20,
            s_per_call=(time.perf_counter() - t) / max(1, calls - pop)))
        log(f"memory {placement}: {result['memory'][-1]}")
    return result


def table(res: dict) -> str:
    head = (f"{res['model']}, SST-2 {res['examples']} examples, population {res['population']}; GEMM "
            f"{res['matmul_gflops']:.0f} GFLOP/s on {res['machine']['torch_threads']} threads")
    lines = [head, "| m | mode | s/call | examples/s | speedup vs peer (wall, CPU) | tokens/call computed (padded) | "
                   "achieved GFLOP/s | efficiency (wall, CPU) | max_abs_diff | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["modes"]:
        lines.append(f"| {r['m']} | {r['mode']} | {r['s_per_call']:.3f} | {r['examples_per_s']:.1f} | "
                     f"{r['speedup']:.2f}×, {r['speedup_cpu']:.2f}× | {r['computed_tokens_per_call']:.0f} "
                     f"({r['padded_tokens_per_call']:.0f}) | "
                     f"{r['achieved_gflops']:.1f} | "
                     f"{r['efficiency']:.0%}, {r['efficiency_cpu']:.0%} | {r['max_abs_diff']:.1e} | "
                     f"{r['peak_rss_mb']:.0f} |")
    for mem in res.get("memory", []):
        lines.append(f"memory, {mem['placement']} (m={mem['m']}): {mem['calls']} calls, RSS growth "
                     f"{mem['rss_growth_mb']:+.1f} MB after the first generation, kept keys/values "
                     f"{mem['kept_kv_mb']:.1f} MB, peak {mem['peak_rss_mb']:.0f} MB")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--population", type=int, help="candidates per generation (default 20, BBT's; --quick: 2)")
    p.add_argument("--tokens", type=int, nargs="+", help="prompt lengths m (default 10 50; --quick: 10)")
    p.add_argument("--calls", type=int, help="calls per kv-reusing mode for the memory check (default 1000; "
                                             "--quick: 8)")
    p.add_argument("--repeats", type=int, default=1, help="timed repetitions of each population (median)")
    p.add_argument("--diff-candidates", type=int, default=2, help="candidates checked against the references")
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice, one per core)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smaller defaults for a smoke run: population 2, "
                                                         "m = 10, 8 calls (flags given explicitly still apply)")
    p.add_argument("--note", default="", help="free text stored with the machine description")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout instead of a table")
    p.add_argument("--silent", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    defaults = dict(population=2, tokens=[10], calls=8) if args.quick else dict(population=20, tokens=[10, 50],
                                                                                 calls=1000)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.diff_candidates = min(args.diff_candidates, args.population)
    res = run(args)
    print(json.dumps(res, indent=1) if args.json else table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
