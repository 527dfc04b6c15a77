"""Many workers, one storage: claims and leases, takeover of a dead worker's study, the queue that `bbpt
worker` drains, and the schema migrations that brought the work table in.

The multi-process tests run real `bbpt study run` / `bbpt worker` processes (one thread each, so scores are
bit-for-bit repeatable) on a twelve-study grid of the tiny model, kill one mid-study, and compare everything
the grid stored with what one uninterrupted worker stores.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from bbpt.cli import main
from bbpt.errors import StorageError
from bbpt.storage import Storage
from bbpt.storage.work import LeaseLost, SpecSource, Work
from study_helpers import REPO, child_env, cli, copy_db, dump

GRID = """
name = "{name}"
model = {model!r}
device = "cpu"
tasks = ["sst2"]
seeds = [0, 1, 2]
shots = 4
max_test = 16
prompt_tokens = 3
intrinsic_dim = 8
popsize = 4
budget = 160
runs_dir = "runs"

[[arms]]
name = "manual"
optimizer = "manual"

[[arms]]
name = "bp"
optimizer = "backprop"
budget = 4

[[arms]]
name = "cma"
optimizer = "cma"

[[arms]]
name = "random"
optimizer = "random"
"""
LEASE = "3"     # seconds: a dead worker's study is taken over about this long after it died


def write_grid(folder: Path, model: str, name: str = "grid") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "grid.toml"
    spec.write_text(GRID.format(name=name, model=model))
    return spec


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    """A worker process; its log goes to a file beside it (a pipe nobody reads could fill and stall it)."""
    env = dict(child_env(), BBPT_LEASE_SECONDS=LEASE)
    log = open(cwd / f"worker-{time.monotonic_ns()}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "bbpt.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=log, text=True)
    proc.log = Path(log.name)
    log.close()
    return proc


def logs(procs) -> str:
    return " | ".join(p.log.read_text()[-1500:] for p in procs)


def stored(url: str, prefix: str) -> dict:
    """Everything a study's results are made of, timings left out: trials (number, loss, z), evaluations
    and the summary, per study."""
    st = Storage(url, read_only=True)
    out = {}
    for row in st.list_studies():
        if not row.name.startswith(prefix + "/"):
            continue
        evals = [(e.split, e.trial_number, e.calls_at, e.tokens, e.note,
                  {k: v for k, v in e.metrics.items() if "seconds" not in k}) for e in st.evaluations(row.id)]
        summary = {k: v for k, v in (row.summary or {}).items()     # less where it ran and how long it took
                   if "seconds" not in k and k not in ("machine", "study", "storage", "prompt_path")}
        out[row.name.split("/", 1)[1]] = dict(
            state=row.state, trials=[(t.number, t.loss, t.z) for t in st.trials(row.id)], evals=evals,
            summary=summary)
    return out


def timeless(report: str) -> str:
    """A report less where and when it ran: paths, dates, machine, total time, the seconds column, the seconds
    ratios against the reference arm, and the table read at a multiple of the reference's seconds (which
    prompt a search had selected by then depends on how fast it ran)."""
    out, seconds_col, at_seconds = [], None, False
    for line in report.splitlines():
        if line.startswith(("- reproduce:", "- spec:", "- studies:", "- machine:", "- total time:")):
            continue
        at_seconds = line.startswith("The same, for the prompt dev had selected") or (
            at_seconds and not line.startswith("## "))
        if at_seconds:
            continue
        line = re.sub(r"; \d+\.\d+x\)", "; t)", line)
        if line.startswith("|"):
            cells = line.split("|")
            names = [c.strip() for c in cells]
            if "seconds" in names:
                seconds_col = names.index("seconds")
            elif seconds_col is not None and len(cells) > seconds_col and not set(names[seconds_col]) <= {"-"}:
                cells[seconds_col] = "t"
            line = "|".join(cells)
        out.append(line)
    return "\n".join(out)


def report(spec: Path, url: str, out: Path) -> str:
    assert main(["-q", "study", "report", str(spec), "--storage", url, "--out", str(out)]) == 0
    return out.read_text()


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory, tiny_model_dir):
    """The grid run by one uninterrupted worker: what every other way of running it must store."""
    folder = tmp_path_factory.mktemp("one")
    spec = write_grid(folder, tiny_model_dir)
    url = f"sqlite:///{folder / 'one.db'}"
    done = cli(["-q", "study", "run", "grid.toml", "--storage", url, "--no-progress"], cwd=folder)
    assert done.returncode == 0, done.stderr[-3000:]
    return SimpleNamespace(spec=spec, url=url, stored=stored(url, "grid"),
                           report=timeless(report(spec, url, folder / "one.md")))


def kill_mid_study(url: str, procs: list[subprocess.Popen], sig=signal.SIGKILL, timeout: float = 240) -> str:
    """Wait until a worker holds a tuned study with trials stored but its budget not spent, send it ``sig``;
    returns the study's name."""
    st, deadline = None, time.time() + timeout
    by_pid = {p.pid: p for p in procs}
    while time.time() < deadline:
        try:
            st = st or Storage(url, read_only=True)
            rows = Work(st).rows()
        except StorageError:        # the first worker has not created the database yet
            rows = {}
        for name, row in rows.items():
            pid = int(row.worker.split(":")[1]) if row.worker else None
            study = st.get_study(name)
            if pid in by_pid and study is not None and study.state == "running" and "/bp/" not in name:
                ck = st.last_checkpoint(study.id)
                if ck is not None and 0 < ck.loop_state["calls"] < study.config["budget"] // 2:
                    by_pid[pid].send_signal(sig)
                    return name
        if all(p.poll() is not None for p in procs):
            break
        time.sleep(0.02)
    raise AssertionError("no worker was caught mid-study: " + logs(procs))


def finish(procs: list[subprocess.Popen], timeout: float = 600) -> list[int]:
    codes = []
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            raise
        codes.append(p.returncode)
    return codes


@pytest.mark.parametrize("kind,workers", [("sqlite", 2), ("postgresql", 3)])
def test_workers_share_a_grid_and_take_over_a_killed_one(kind, workers, request, one_worker, tmp_path,
                                                         tiny_model_dir):
    name = "grid" if kind == "sqlite" else f"grid{os.getpid()}"   # a server given by URL may hold other grids
    url = request.getfixturevalue("postgres_url") if kind == "postgresql" else f"sqlite:///{tmp_path / 'many.db'}"
    spec = write_grid(tmp_path, tiny_model_dir, name)
    procs = [start(["-q", "study", "run", "grid.toml", "--storage", url, "--no-progress"], tmp_path)
             for _ in range(workers)]
    killed = kill_mid_study(url, procs)
    codes = finish(procs)
    assert sorted(codes) == sorted([-signal.SIGKILL] + [0] * (workers - 1)), logs(procs)

    got = stored(url, name)
    assert set(got) == set(one_worker.stored) and all(s["state"] == "complete" for s in got.values())
    for study, want in one_worker.stored.items():     # no trial lost or twice, every score the same
        assert got[study] == want, study
    work = Work(Storage(url, read_only=True)).rows()
    assert {r.state for n, r in work.items() if n.startswith(name)} == {"done"}
    # Claimed by the worker that died, then taken over (a claim that finds the study finished by another
    # worker a moment before counts too, so at least two).
    assert work[killed].runs >= 2 and work[killed].worker is None
    want = re.sub(r"\bgrid(?=[`/.-])", name, one_worker.report)    # the study, plot and reading names
    assert timeless(report(spec, url, tmp_path / "many.md")) == want


def test_queued_work_is_drained_by_workers_and_ctrl_c_hands_a_study_back(one_worker, tmp_path, tiny_model_dir):
    spec = write_grid(tmp_path, tiny_model_dir)
    url = f"sqlite:///{tmp_path / 'queue.db'}"
    queued = cli(["study", "queue", "grid.toml", "--storage", url], cwd=tmp_path)
    assert queued.returncode == 0 and "queued 12 studies" in queued.stdout, queued.stderr
    worker = start(["-q", "worker", "--storage", url, "--no-progress"], tmp_path)
    stopped = kill_mid_study(url, [worker], signal.SIGTERM)
    assert finish([worker]) == [130]
    row = Work(Storage(url, read_only=True)).rows()[stopped]
    assert (row.state, row.worker, row.lease_until) == ("pending", None, 0.0)   # free at once, not in 3 s

    listing = cli(["study", "run", "grid.toml", "--storage", url, "--dry-run"], cwd=tmp_path)
    assert "held by" not in listing.stdout
    drained = cli(["-q", "worker", "--storage", url, "--no-progress", "--until-empty"], cwd=tmp_path)
    assert drained.returncode == 0, drained.stderr[-3000:]
    assert stored(url, "grid") == one_worker.stored
    assert timeless(report(spec, url, tmp_path / "q.md")) == one_worker.report


# -- claims and leases, in-process ------------------------------------------------------------------------

SOURCE = SpecSource("s", "s.toml", 'name = "s"')


def test_a_claim_is_exclusive_until_released_or_lapsed(storage_url):
    st = Storage(storage_url)
    a, b = Work(st, "a", 30), Work(st, "b", 30)
    lease = a.claim("s/t/x/seed0", SOURCE)
    assert lease is not None and b.claim("s/t/x/seed0", SOURCE) is None
    assert a.claim("s/t/x/seed0", SOURCE) is not None         # its own claim again: a resume, not a conflict
    lease.release("pending")
    assert b.claim("s/t/x/seed0", SOURCE) is not None          # handed back: free at once
    with st.session() as s, s.begin():                          # b dies: its lease lapses
        s.execute(sqlalchemy_update_lease("s/t/x/seed0", time.time() - 1))
    taken = a.claim("s/t/x/seed0", SOURCE)
    assert taken is not None and Work(st).rows()["s/t/x/seed0"].runs == 4


def sqlalchemy_update_lease(name: str, until: float):
    from sqlalchemy import update

    from bbpt.storage.models import WorkRow

    return update(WorkRow).where(WorkRow.name == name).values(lease_until=until)


def test_a_worker_that_lost_its_lease_writes_nothing_more(storage_url):
    st = Storage(storage_url)
    st.create_study("s/t/x/seed0", {"optimizer": "cma", "budget": 1}, bbpt_version="t", model="m")
    study = st.get_study("s/t/x/seed0")
    a, b = Work(st, "a", 30), Work(st, "b", 30)
    lease = a.claim(study.name, SOURCE)
    fenced = st.fenced(lease)
    fenced.add_evaluations(study.id, [dict(trial_number=None, split="dev", metrics={"accuracy": 0.5})])
    with st.session() as s, s.begin():          # a stalls past its lease, and b takes the study over
        s.execute(sqlalchemy_update_lease(study.name, time.time() - 1))
    assert b.claim(study.name, SOURCE) is not None
    before = dump(storage_url)
    with pytest.raises(LeaseLost, match="lost its lease, and b holds it now"):
        fenced.add_evaluations(study.id, [dict(trial_number=None, split="test", metrics={"accuracy": 0.5})])
    with pytest.raises(LeaseLost):
        fenced.commit_generation(study.id, [], dict(generation=1, optimizer_state=b"", loop_state={}), [])
    assert dump(storage_url) == before
    assert [e.split for e in st.evaluations(study.id)] == ["dev"]


def test_queue_takes_studies_oldest_first_and_skips_held_ones(storage_url):
    st = Storage(storage_url)
    q, w1, w2 = Work(st, "q"), Work(st, "w1"), Work(st, "w2")
    assert q.enqueue(["s/1", "s/2", "s/3"], SOURCE) == 3 and q.enqueue(["s/1"], SOURCE) == 0
    row1, lease1 = w1.claim_next()
    row2, _ = w2.claim_next()
    assert (row1.name, row2.name) == ("s/1", "s/2")
    lease1.release("done")
    assert w1.claim_next()[0].name == "s/3" and w1.claim_next() is None
    assert q.enqueue(["s/1"], SOURCE) == 1       # finished work queued again (its study was deleted, say)


def test_dry_run_and_studies_list_show_who_holds_a_study(one_worker, tmp_path, capsys):
    url = copy_db(one_worker.url, tmp_path / "held.db")
    st = Storage(url)
    name = "grid/sst2/cma/seed1"
    st.update_study(name, state="running")
    Work(st, "gpu7:4242:beef", 60).claim(name, SOURCE)
    assert main(["study", "run", str(one_worker.spec), "--storage", url, "--dry-run"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(name))
    assert re.search(r"held by gpu7:4242:beef, lease (59|60) s left", line), line
    assert main(["studies", "list", "--storage", url]) == 0
    assert "held by gpu7:4242:beef" in capsys.readouterr().out


# -- schema migrations ---------------------------------------------------------------------------------------

COMMITTED = REPO / "studies" / "sst2_gradient_vs_dfo.toml"


def as_written_before_migrations(url: str) -> None:
    """Take a database (the committed ones are upgraded) back to what bbpt wrote before it had migrations:
    schema 1, no work table, no alembic_version."""
    from alembic import command
    from sqlalchemy import create_engine

    from bbpt.storage.migrate import alembic_config

    if Storage(url, read_only=True).schema == 1:
        return
    engine = create_engine(url)
    with engine.begin() as c:
        command.downgrade(alembic_config(c), "0001")
        c.exec_driver_sql("DROP TABLE alembic_version")
    engine.dispose()


def test_a_committed_database_upgrades_in_place_and_reports_byte_for_byte(tmp_path, monkeypatch, capsys):
    from bbpt.studyspec import load_spec, write_report

    results = COMMITTED.parent / "results"
    (tmp_path / "studies" / "results").mkdir(parents=True)      # the committed layout, in a scratch folder
    shutil.copy(COMMITTED, tmp_path / "studies")
    for f in ("sst2_gradient_vs_dfo.db", "sst2_gradient_vs_dfo.reading.md"):
        shutil.copy(results / f, tmp_path / "studies" / "results")
    monkeypatch.chdir(tmp_path)
    rel, url = "studies/sst2_gradient_vs_dfo.toml", "sqlite:///studies/results/sst2_gradient_vs_dfo.db"
    committed = (results / "sst2_gradient_vs_dfo.md").read_text()
    as_written_before_migrations(url)
    assert Storage(url, read_only=True).schema == 1
    before = dump(url)
    with pytest.raises(StorageError, match=r"has schema 1, from an older bbpt.*bbpt storage upgrade --storage"):
        Storage(url)                                              # writing needs the upgrade; refused, unchanged
    assert dump(url) == before
    assert write_report(load_spec(rel), spec_arg=rel).read_text() == committed     # reading does not

    assert main(["storage", "upgrade", "--storage", url]) == 0
    assert "schema revision 0001 -> 0002" in capsys.readouterr().out
    assert main(["storage", "upgrade", "--storage", url]) == 0
    assert "already at revision 0002" in capsys.readouterr().out
    assert Storage(url).schema == 2
    assert write_report(load_spec(rel), spec_arg=rel).read_text() == committed


def test_migrations_build_exactly_the_tables_a_new_database_gets(tmp_path):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import create_engine

    from bbpt.storage.migrate import upgrade
    from bbpt.storage.models import Base

    engine = create_engine(f"sqlite:///{tmp_path / 'migrated.db'}")
    assert upgrade(engine) == (None, "0002")
    with engine.connect() as c:
        assert compare_metadata(MigrationContext.configure(c), Base.metadata) == []
    assert Storage(f"sqlite:///{tmp_path / 'migrated.db'}").schema == 2


def test_a_newer_schema_is_refused_by_name(storage_url):
    st = Storage(storage_url)
    with st.session() as s, s.begin():
        s.connection().exec_driver_sql("INSERT INTO schema_version (version) VALUES (9)")
    with pytest.raises(StorageError, match=r"written by a newer bbpt \(schema 9, this bbpt knows 2\)"):
        Storage(storage_url, create=False)


def test_a_single_optimize_study_queued_runs_on_a_worker_as_it_would_here(tmp_path, tiny_model_dir):
    from study_helpers import optimize_args, trial_rows

    here, queued = f"sqlite:///{tmp_path / 'here.db'}", f"sqlite:///{tmp_path / 'queued.db'}"
    ran = cli(optimize_args(tiny_model_dir, here, "one", budget=12), cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr[-2000:]
    put = cli(optimize_args(tiny_model_dir, queued, "one", budget=12) + ["--queue"], cwd=tmp_path)
    assert put.returncode == 0 and "queued study one" in put.stdout, put.stderr[-2000:]
    assert Storage(queued, read_only=True).get_study("one") is None      # queued, not run
    drained = cli(["-q", "worker", "--storage", queued, "--no-progress", "--until-empty"], cwd=tmp_path)
    assert drained.returncode == 0, drained.stderr[-2000:]
    assert Storage(queued, read_only=True).require_study("one").state == "complete"
    assert trial_rows(queued, "one") == trial_rows(here, "one")
    again = cli(optimize_args(tiny_model_dir, queued, "one", budget=12) + ["--queue"], cwd=tmp_path)
    assert again.returncode == 2 and "study 'one'" in again.stderr and "is complete" in again.stderr


def test_a_worker_pointed_at_no_database_says_so_and_creates_none(tmp_path, capsys):
    missing = tmp_path / "typo.db"
    assert main(["worker", "--storage", f"sqlite:///{missing}", "--until-empty"]) == 2
    assert "there is no database at" in capsys.readouterr().err and not missing.exists()
