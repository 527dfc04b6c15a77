"""Helpers shared by the storage, resume and compare/export tests: run the real CLI, read a database back.

Studies here use the tiny random model and a few shots so a whole `bbpt optimize` takes seconds; child
processes get one thread each, both to stay light beside other work and so scores are bit-for-bit repeatable.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]


def child_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.pop("BBPT_STORAGE", None)
    return env


def optimize_args(model: str, url: str, study: str, *, optimizer: str = "cma", budget: int = 40,
                  runs_dir: Path | str = "runs", extra: tuple = ()) -> list[str]:
    """A small but real `bbpt optimize` command line: 4 shots per class, 8 test examples."""
    args = ["optimize", "--model", model, "--device", "cpu", "--optimizer", optimizer, "--budget", str(budget),
            "--shots", "4", "--max-test", "8", "--intrinsic-dim", "20", "--prompt-tokens", "4",
            "--study", study, "--storage", url, "--runs-dir", str(runs_dir), "--no-progress", "--json"]
    if optimizer != "backprop":
        args += ["--popsize", "4"]
    return args + list(extra)


def cli(args: list[str], cwd: Path | str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bbpt.cli", *args], cwd=cwd, env=child_env(),
                          capture_output=True, text=True, **kw)


def spawn(args: list[str], cwd: Path | str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bbpt.cli", *args], cwd=cwd, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def db_path(url: str) -> Path:
    return Path(url.split("///", 1)[1])


def dump(url: str) -> str:
    """The whole database content as SQL, read-only: equal dumps mean nothing was written."""
    con = sqlite3.connect(f"file:{db_path(url)}?mode=ro", uri=True)
    try:
        return "\n".join(con.iterdump())
    finally:
        con.close()


def trial_rows(url: str, study: str) -> list[tuple]:
    """(number, generation, z bytes, loss) of every stored trial, in insertion order."""
    con = sqlite3.connect(f"file:{db_path(url)}?mode=ro", uri=True)
    try:
        return con.execute("SELECT t.number, t.generation, t.z, t.loss FROM trials t JOIN studies s "
                           "ON s.id = t.study_id WHERE s.name = ? ORDER BY t.id", (study,)).fetchall()
    finally:
        con.close()


def copy_db(url: str, dest: Path) -> str:
    """A private copy of a database (through SQLite's backup API, so pages still in the WAL come along)."""
    src, dst = sqlite3.connect(db_path(url)), sqlite3.connect(dest)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()
    return f"sqlite:///{dest}"


@pytest.fixture(scope="session")
def finished_db(tmp_path_factory, tiny_model_dir):
    """One database holding two finished tiny studies, "cma" (24 calls) and "bp" (backprop, 8 calls), and
    their saved prompts. Tests that write must work on a ``copy_db`` of it."""
    from bbpt.cli import main

    d = tmp_path_factory.mktemp("finished")
    url = f"sqlite:///{d / 'bbpt.db'}"
    for name, optimizer, budget in (("cma", "cma", 24), ("bp", "backprop", 8)):
        assert main(optimize_args(tiny_model_dir, url, name, optimizer=optimizer, budget=budget,
                                  runs_dir=d / "runs")) == 0
    return SimpleNamespace(url=url, dir=d, runs=d / "runs", model=tiny_model_dir)
