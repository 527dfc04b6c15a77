"""Helpers for the dashboard's tests: studies written straight into storage (as the study loop writes them),
a writer in another process, and ``bbpt dashboard`` in a subprocess on a free loopback port."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from bbpt.storage import Storage
from serve_helpers import ServerProcess

CONFIG = dict(task="sst2", optimizer="cma", budget=100000, dev_ties="earliest", space="projected")


def fake_study(storage: Storage, name: str, trials: int, *, per_generation: int = 20, seed: int = 0,
               evals_every: int = 200) -> int:
    """A cma-like study of ``trials`` trials (noisy losses drifting down, a dev check every ``evals_every``)
    written generation by generation through the loop's own write path; returns its id."""
    row = storage.create_study(name, dict(CONFIG), bbpt_version="test", model="tiny")
    rng = np.random.default_rng(seed)
    n, best, calls, secs = 0, np.inf, 0, 0.0
    while n < trials:
        gen = n // per_generation
        batch = []
        for _ in range(min(per_generation, trials - n)):
            loss = float(1.0 / (1 + 0.002 * n) + rng.normal(0, 0.05))
            batch.append(dict(number=n, generation=gen, z=b"", loss=loss, metrics={"accuracy": 0.5}, calls=1,
                              tokens=320, seconds=0.5))
            best, n, calls, secs = min(best, loss), n + 1, calls + 1, secs + 0.5
        evals = []
        if n % evals_every < per_generation:
            evals.append(dict(trial_number=n - 1, split="dev", metrics={"accuracy": min(1.0, 0.5 + n / (4 * trials)),
                                                                    "loss": 1.0 - n / (2 * trials)},
                              calls_at=calls, seconds_at=secs, tokens=320, note=""))
        storage.commit_generation(row.id, batch, dict(generation=gen, optimizer_state=b"", best_trial=n - 1,
                                                      loop_state=dict(calls=calls, best_loss=best)), evals)
    return row.id


# Run in another process by the live test: appends one generation every `pause` seconds to a fake study, and
# exits non-zero with the error (say, "database is locked") if a write ever fails.
WRITER = """
import sys, time
sys.path.insert(0, {tests!r})
from bbpt.storage import Storage
from dashboard_helpers import fake_study
s = Storage({url!r})
row = s.get_study({name!r})
n = len(s.trials(row.id))
for g in range({generations}):
    time.sleep({pause})
    batch = [dict(number=n + i, generation=1000 + g, z=b"", loss=0.1, metrics={{}}, calls=1, tokens=1, seconds=0.1)
             for i in range(5)]
    n += 5
    s.commit_generation(row.id, batch, dict(generation=1000 + g, optimizer_state=b"", best_trial=n - 1,
                                            loop_state=dict(calls=n, best_loss=0.1)), [])
    print(n, time.time(), flush=True)
"""


def start_writer(url: str, name: str, generations: int, pause: float) -> subprocess.Popen:
    code = WRITER.format(tests=str(Path(__file__).parent), url=url, name=name, generations=generations, pause=pause)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class DashboardProcess(ServerProcess):
    """``bbpt dashboard`` in a subprocess on a free loopback port (started, logged and stopped as a server)."""

    HEALTH = "/api/version"

    def __init__(self, *args: str, log_dir: Path):
        super().__init__("", log_dir, *args)
        self.log_path = Path(log_dir) / f"dashboard-{self.port}.log"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "bbpt.cli", "dashboard", "--port", str(self.port), *self.args]
