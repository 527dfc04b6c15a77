"""What sharing one storage among workers costs: claim, lease renewal and fenced-commit latency, and a small
grid's wall time with one and with two local `bbpt study run` workers.

The latencies are per operation on a fresh database (SQLite file; PostgreSQL too with ``--postgres URL``),
the median and p99 of ``--ops`` operations, one process. The grid is four studies of the default model
(SST-2, CMA-ES and random search, two seeds each, 40 calls): one worker with all the cores, then two workers
with half each (``study run --workers 2``), into fresh SQLite files. This says whether N workers give N
times the studies: the coordination is milliseconds a generation, so what limits a host is its cores.

    python benchmarks/coordination.py --json > benchmarks/results/coordination-2cpu-DATE.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

GRID = """
name = "coord"
tasks = ["sst2"]
seeds = [0, 1]
shots = 8
max_test = 64
popsize = 10
budget = 40
eval_every = 20

[[arms]]
name = "cma"
optimizer = "cma"

[[arms]]
name = "random"
optimizer = "random"
"""


def ms(samples: list[float]) -> dict:
    samples = sorted(samples)
    return dict(median_ms=round(statistics.median(samples) * 1e3, 3),
                p99_ms=round(samples[min(len(samples) - 1, int(0.99 * len(samples)))] * 1e3, 3))


def latencies(url: str, ops: int) -> dict:
    from bbpt.storage import Storage
    from bbpt.storage.work import SpecSource, Work

    st = Storage(url)
    tag = f"bench{os.getpid()}"
    work = Work(st, "bench", 60)
    source = SpecSource(tag, "bench.toml", "")
    claims, renews, plain, fenced = [], [], [], []
    leases = []
    for i in range(ops):
        t = time.perf_counter()
        leases.append(work.claim(f"{tag}/t/a/seed{i}", source))
        claims.append(time.perf_counter() - t)
    for lease in leases:
        t = time.perf_counter()
        lease.renew()
        renews.append(time.perf_counter() - t)
    row = st.create_study(f"{tag}/t/a/seed0", {"optimizer": "cma", "budget": ops}, bbpt_version="bench", model="m")
    study = st.get_study(row.name)
    trial = dict(generation=0, z=b"\0" * 2000, loss=0.5, metrics={}, calls=1, tokens=100, seconds=1.0)
    under = st.fenced(leases[0])
    for i in range(ops):        # one generation of 20 trials a commit, as the default population writes
        for store, out in ((st, plain), (under, fenced)):
            n = len(plain) + len(fenced)
            trials = [dict(trial, number=n * 20 + k) for k in range(20)]
            t = time.perf_counter()
            store.commit_generation(study.id, trials, dict(generation=n + 1, optimizer_state=b"",
                                                           loop_state={}), [])
            out.append(time.perf_counter() - t)
    st.delete_study(study.name)
    for lease in leases:
        lease.release("done")
    return dict(claim=ms(claims), renew=ms(renews), commit_generation=ms(plain), fenced_commit_generation=ms(fenced))


def grid_seconds(workers: int, folder: Path) -> float:
    spec = folder / f"coord{workers}.toml"
    spec.write_text(GRID)
    cmd = [sys.executable, "-m", "bbpt.cli", "-q", "study", "run", str(spec), "--no-progress",
           "--storage", f"sqlite:///{folder / f'coord{workers}.db'}"] + (["--workers", str(workers)] if workers > 1 else [])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=folder)
    return round(time.perf_counter() - t, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ops", type=int, default=200)
    ap.add_argument("--postgres", help="a PostgreSQL URL to measure too (postgresql+psycopg://...)")
    ap.add_argument("--no-grid", action="store_true", help="latencies only")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bbpt-coord-"))
    out = dict(machine=f"{platform.platform(terse=True)}; {os.cpu_count()} CPUs", ops=args.ops,
               sqlite=latencies(f"sqlite:///{folder / 'lat.db'}", args.ops))
    if args.postgres:
        out["postgresql"] = latencies(args.postgres, args.ops)
    if not args.no_grid:
        one = grid_seconds(1, folder)
        two = grid_seconds(2, folder)
        out["grid"] = dict(studies=4, calls_each=40, one_worker_s=one, two_workers_s=two, speedup=round(one / two, 2))
    print(json.dumps(out, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
