"""Load on a running ``bbpt serve``: N concurrent clients send ``/v1/score`` requests for S seconds.

Each client keeps one request in flight: a population of random prompt offsets over the first E SST-2
training examples (all clients share the examples, as tuners of one task do, so the server may merge their
requests into one forward). Prints requests/s, candidate-calls/s, p50/p99 latency, errors, and how many requests the server merged into each
forward (its /health counters, read before and after), as JSON.

    bbpt serve --model smollm2-135m --port 8000 &
    python benchmarks/serve_load.py --endpoint http://127.0.0.1:8000 --clients 4 --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx
import numpy as np

from bbpt.prompt import PromptInit
from bbpt.tasks import load_task
from bbpt.wire import score_request


async def client(i: int, http: httpx.AsyncClient, args, card: dict, examples: list[dict], stop_at: float,
                 latencies: list[float], errors: list[str]) -> None:
    rng = np.random.default_rng(i)
    width, std = card["hidden_size"], card["embed_std"]
    init = PromptInit("text", args.prompt_tokens, 0, "Classify the sentiment of this movie review.")
    while time.perf_counter() < stop_at:
        deltas = rng.standard_normal((args.pop, args.prompt_tokens, width)).astype(np.float32) * std * 0.1
        body = score_request(card["id"], examples, "Review: {text}\nSentiment:", [" negative", " positive"],
                             init=init, deltas=deltas)
        start = time.perf_counter()
        try:
            r = await http.post("/v1/score", json=body)
            if r.status_code != 200:
                errors.append(f"HTTP {r.status_code}")
                continue
        except httpx.HTTPError as e:
            errors.append(type(e).__name__)
            continue
        latencies.append(time.perf_counter() - start)


async def main(args) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.endpoint.rstrip("/"), headers=headers, timeout=600,
                                 limits=httpx.Limits(max_connections=args.clients)) as http:
        card = (await http.get("/v1/models")).json()["data"][0]
        task = load_task(task="sst2", shots=16, seed=0)
        examples = [{"text": e.text} for e in task.train[:args.examples]]
        latencies, errors = [], []
        before = (await http.get("/health")).json()
        start = time.perf_counter()
        await asyncio.gather(*(client(i, http, args, card, examples, start + args.seconds, latencies, errors)
                               for i in range(args.clients)))
        wall = time.perf_counter() - start
        after = (await http.get("/health")).json()
    served = after["score_requests"] - before["score_requests"]
    forwards = after["forwards"] - before["forwards"]
    lat = np.asarray(latencies) if latencies else np.asarray([np.nan])
    return dict(model=card["id"], clients=args.clients, seconds=round(wall, 1), pop=args.pop,
                examples=args.examples, requests=len(latencies), errors=len(errors), error_kinds=sorted(set(errors)),
                requests_per_s=round(len(latencies) / wall, 3),
                candidate_calls_per_s=round(len(latencies) * args.pop / wall, 3),
                p50_s=round(float(np.percentile(lat, 50)), 3), p99_s=round(float(np.percentile(lat, 99)), 3),
                server_requests=served, server_forwards=forwards,
                requests_per_forward=round(served / forwards, 2) if forwards else None)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--endpoint", default="http://127.0.0.1:8000")
    p.add_argument("--api-key")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--pop", type=int, default=2, help="candidates per request")
    p.add_argument("--examples", type=int, default=8, help="examples per request")
    p.add_argument("--prompt-tokens", type=int, default=10)
    print(json.dumps(asyncio.run(main(p.parse_args()))))
