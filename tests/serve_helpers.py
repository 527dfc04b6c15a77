"""Helpers for tests that talk to a real ``bbpt serve``: a server subprocess on a free loopback port, a
fault-injecting TCP proxy, and a short study run through the CLI."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from bbpt.cli import main as cli_main
from bbpt.storage import Storage


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``bbpt serve`` in a subprocess, one torch thread so tests leave the CPU to others."""

    def __init__(self, model: str, log_dir: Path, *args: str, port: int | None = None):
        self.model, self.args, self.port = model, list(args), port or free_port()
        self.log_path = Path(log_dir) / f"serve-{self.port}.log"
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    HEALTH = "/health"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "bbpt.cli", "serve", "--model", self.model, "--device", "cpu", "--threads", "1",
                "--port", str(self.port), *self.args]

    def start(self, timeout: float = 120) -> "ServerProcess":
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        cmd = self.command()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{' '.join(cmd[2:5])} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + self.HEALTH, timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{' '.join(cmd[2:5])} did not come up in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, connections in flight are cut."""
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


class FaultProxy:
    """A TCP proxy in front of a server that spoils a fraction of requests.

    Each spoiled request gets one of: a 500, a 429 with Retry-After, a delay past the client's timeout (the
    request never reaches the server), or a connection reset. The rest are forwarded untouched. One request
    per connection (the proxy asks the server to close), which keeps the parsing to a Content-Length body.
    ``script`` spoils the first requests in a fixed order instead (None: forward, a kind, or any HTTP status), and
    ``bodies`` holds every forwarded request body, so tests can count what reached the server.
    """

    KINDS = ("500", "429", "delay", "reset")

    def __init__(self, upstream_port: int, rate: float = 0.2, seed: int = 0, delay: float = 3.0,
                 script: list[str | None] | None = None, retry_after: float = 0):
        self.upstream_port, self.rate, self.delay = upstream_port, rate, delay
        self.rng = random.Random(seed)
        self.port = free_port()
        self.faults: Counter = Counter()
        self.forwarded = 0
        self.bodies: list[bytes] = []
        self.script = list(script or [])
        self.retry_after = retry_after
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FaultProxy":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(asyncio.start_server(self._handle, "127.0.0.1", self.port),
                                         self._loop).result()
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)

    async def _handle(self, reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            length = next((int(v) for k, _, v in (ln.partition(":") for ln in lines)
                           if k.strip().lower() == "content-length"), 0)
            body = await reader.readexactly(length)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        if self.script:
            kind = self.script.pop(0)
        else:
            kind = self.rng.choice(self.KINDS) if self.rng.random() < self.rate else None
        if kind:
            self.faults[kind] += 1
        if kind and kind.isdigit():         # an HTTP error status: "500", "429" (with Retry-After), "401", ...
            msg = b'{"error": {"message": "injected fault"}}'
            status = kind.encode() + b" Injected Fault"
            if kind == "429":
                status += b"\r\nRetry-After: " + str(self.retry_after).encode()
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\nContent-Length: "
                         + str(len(msg)).encode() + b"\r\nConnection: close\r\n\r\n" + msg)
        elif kind == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            writer.transport.abort()
            return
        elif kind == "delay":
            await asyncio.sleep(self.delay)
        else:
            kept = [ln for ln in lines[1:] if ln and not ln.lower().startswith("connection:")]
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            up_w.write(("\r\n".join([lines[0], *kept, "Connection: close"]) + "\r\n\r\n").encode("latin-1") + body)
            await up_w.drain()
            answer = await up_r.read()
            up_w.close()
            # Count before answering: the client runs in another thread and may read these counters the
            # moment the answer arrives (CI once saw forwarded == 1 after the second answer came back).
            self.forwarded += 1
            self.bodies.append(body)
            writer.write(answer)
        try:
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()


STUDY_ARGS = ["--task", "sst2", "--optimizer", "cma", "--popsize", "4", "--intrinsic-dim", "16",
              "--prompt-tokens", "4", "--init", "text:Classify the review.", "--max-test", "16", "--seed", "3",
              "--no-progress", "--json"]


def _study_url(tmp_path: Path, name: str) -> str:
    return f"sqlite:///{tmp_path / (name + '.db')}"


def _optimize_argv(tmp_path: Path, name: str, budget: int, *args: str) -> list[str]:
    return ["-q", "optimize", *STUDY_ARGS, "--budget", str(budget), "--study", name,
            "--storage", _study_url(tmp_path, name), "--runs-dir", str(tmp_path / "runs"), *args]


class StudyThread:
    """A short CMA-ES study run through the CLI in a thread, so a test can break something while it runs."""

    def __init__(self, tmp_path: Path, name: str, *args: str, budget: int):
        self.name, self.url, self.rc = name, _study_url(tmp_path, name), None
        argv = _optimize_argv(tmp_path, name, budget, *args)
        self.thread = threading.Thread(target=lambda: setattr(self, "rc", cli_main(argv)))
        self.thread.start()
        self.store = Storage(self.url)

    def wait_for_trials(self, n: int) -> int:
        """Wait until the study has stored at least ``n`` trials (or ended); returns how many it has."""
        done = 0
        while self.thread.is_alive() and done < n:
            row = self.store.get_study(self.name)
            done = len(self.store.trials(row.id, with_z=False)) if row else 0
            time.sleep(0.02)
        return done

    def join(self, timeout: float = 300) -> int | None:
        self.thread.join(timeout=timeout)
        return self.rc


def run_study(tmp_path: Path, name: str, *args: str, budget: int = 24) -> dict:
    """Run a short CMA-ES study through the CLI; return its trials' losses and its summary row."""
    url = _study_url(tmp_path, name)
    rc = cli_main(_optimize_argv(tmp_path, name, budget, *args))
    assert rc == 0
    store = Storage(url)
    row = store.require_study(name)
    trials = store.trials(row.id)
    return dict(losses=[t.loss for t in trials], numbers=[t.number for t in trials],
                states={t.state for t in trials}, summary=row.summary, trials=trials)
