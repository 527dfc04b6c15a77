"""Studies on disk: inspect them, resume them (or refuse to), share one SQLite file between processes, run
against a real PostgreSQL server, and reject bad storage with a clear message, exit code 2 and no write."""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3

import pytest

from bbpt.cli import main
from bbpt.storage import Storage
from bbpt.storage.models import SCHEMA_VERSION
from study_helpers import copy_db, db_path, dump, finished_db, optimize_args, spawn, trial_rows  # noqa: F401


def test_trials_csv_has_one_row_per_trial(finished_db, capsys):
    assert main(["trials", "cma", "--csv", "--storage", finished_db.url]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [int(r["number"]) for r in rows] == list(range(24))
    assert {r["state"] for r in rows} == {"complete"} and {r["calls"] for r in rows} == {"1"}
    summary = Storage(finished_db.url).require_study("cma").summary
    assert min(float(r["loss"]) for r in rows) == pytest.approx(summary["best_train_loss"], abs=1e-6)


def test_studies_list_show_delete(finished_db, tmp_path, capsys):
    url = copy_db(finished_db.url, tmp_path / "copy.db")
    assert main(["studies", "list", "--storage", url]) == 0
    lines = {ln.split()[0]: ln.split() for ln in capsys.readouterr().out.splitlines()[1:]}
    assert lines["cma"][2:5] == ["cma", "complete", "24/24"] and lines["bp"][2:5] == ["backprop", "complete", "8/8"]

    assert main(["studies", "show", "bp", "--storage", url]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["config"]["optimizer"] == "backprop" and shown["progress"]["calls"] == 8
    assert shown["summary"]["selected_trial"] in range(8)

    assert main(["studies", "delete", "cma", "--storage", url]) == 0
    capsys.readouterr()
    assert main(["studies", "list", "--storage", url]) == 0
    assert [ln.split()[0] for ln in capsys.readouterr().out.splitlines()[1:]] == ["bp"]
    assert trial_rows(url, "cma") == [] and len(trial_rows(url, "bp")) == 8
    con = sqlite3.connect(db_path(url))
    for table in ("trials", "checkpoints", "evaluations"):     # nothing of the deleted study is left behind
        orphans = f"SELECT count(*) FROM {table} WHERE study_id NOT IN (SELECT id FROM studies)"
        assert con.execute(orphans).fetchone() == (0,), table
    con.close()


def test_config_mismatch_on_resume_names_the_keys_and_writes_nothing(finished_db, tmp_path, capsys):
    url = copy_db(finished_db.url, tmp_path / "copy.db")
    before = dump(url)
    args = optimize_args(finished_db.model, url, "cma", budget=24, runs_dir=tmp_path / "runs",
                         extra=("--seed", "1", "--sigma0", "0.5"))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "study 'cma' exists with a different config" in err
    assert "seed: stored 0 vs now 1" in err and "sigma0: stored 1.0 vs now 0.5" in err
    assert dump(url) == before and not (tmp_path / "runs").exists()


def test_a_larger_budget_resumes_and_continues(finished_db, tmp_path, capsys):
    url = copy_db(finished_db.url, tmp_path / "copy.db")
    before = trial_rows(url, "cma")
    assert main(optimize_args(finished_db.model, url, "cma", budget=32, runs_dir=tmp_path / "runs")) == 0
    after = trial_rows(url, "cma")
    assert [r[0] for r in after] == list(range(32)) and after[:24] == before
    capsys.readouterr()
    assert main(["studies", "show", "cma", "--storage", url]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["config"]["budget"] == 32 and shown["summary"]["calls"] == 32


def test_two_processes_share_one_sqlite_file(tmp_path, tiny_model_dir):
    url = f"sqlite:///{tmp_path / 'shared.db'}"     # new: both processes also race to create the schema
    procs = {name: spawn(optimize_args(tiny_model_dir, url, name, optimizer=opt, budget=24), tmp_path)
             for name, opt in (("one", "cma"), ("two", "random"))}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}: {err}"
    for name in procs:
        assert [r[0] for r in trial_rows(url, name)] == list(range(24))
        assert Storage(url).require_study(name).state == "complete"


# -- bad input: a clear message, exit code 2, nothing written ----------------------------------------------

@pytest.mark.parametrize("command", [["studies", "show", "nope"], ["studies", "delete", "nope"],
                                     ["trials", "nope"], ["compare", "cma", "nope"], ["export", "nope",
                                                                                      "--out", "x"]])
def test_unknown_study_name(finished_db, command, capsys):
    before = dump(finished_db.url)
    assert main([*command, "--storage", finished_db.url]) == 2
    err = capsys.readouterr().err
    assert "no study named 'nope'" in err and "'cma'" in err and "bbpt studies list" in err
    assert dump(finished_db.url) == before


@pytest.mark.parametrize("command", [["studies", "list"], ["trials", "cma"], ["optimize"]])
def test_a_file_that_is_not_a_database(tmp_path, command, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("these are my notes, not a database\n")
    assert main([*command, "--storage", f"sqlite:///{f}"]) == 2
    assert f"{f} exists but is not a SQLite database" in capsys.readouterr().err
    assert f.read_text() == "these are my notes, not a database\n"


def test_reading_a_database_that_does_not_exist_creates_none(tmp_path, capsys):
    missing = tmp_path / "typo.db"
    assert main(["studies", "list", "--storage", f"sqlite:///{missing}"]) == 2
    assert f"there is no database at '{missing}'" in capsys.readouterr().err
    assert not missing.exists()


@pytest.mark.parametrize("how", ["uri", "chmod"])
def test_a_read_only_database(finished_db, tmp_path, capsys, how):
    """``chmod 444`` makes SQLite open the file read-only and refuse the first write (SQLITE_READONLY). Root
    ignores file modes, so there the same refusal is produced by opening it with a read-only URI."""
    if how == "chmod" and os.geteuid() == 0:
        pytest.skip("root ignores file permissions; the 'uri' case covers the same SQLite refusal")
    path = db_path(copy_db(finished_db.url, tmp_path / "copy.db"))
    before = dump(f"sqlite:///{path}")
    if how == "chmod":
        path.chmod(0o444)
        url = f"sqlite:///{path}"
    else:
        url = f"sqlite:///file:{path}?mode=ro&uri=true"
    assert main(["studies", "list", "--storage", url]) == 0        # reading is fine
    capsys.readouterr()
    assert main(optimize_args(finished_db.model, url, "fresh", runs_dir=tmp_path / "runs")) == 2
    err = capsys.readouterr().err
    assert "attempt to write a readonly database" in err and "read-only; make it writable" in err
    assert str(path) in err
    assert dump(f"sqlite:///{path}") == before and not (tmp_path / "runs").exists()


# -- PostgreSQL -----------------------------------------------------------------------------------------------

def test_a_study_on_postgresql(postgres_url, tiny_model_dir, tmp_path, capsys):
    name = f"pg-{os.getpid()}"        # a shared server given by URL may hold other studies
    assert main(optimize_args(tiny_model_dir, postgres_url, name, budget=12, runs_dir=tmp_path / "runs")) == 0
    try:
        storage = Storage(postgres_url)
        row = storage.require_study(name)
        assert row.state == "complete" and [t.number for t in storage.trials(row.id)] == list(range(12))
        assert {e.split for e in storage.evaluations(row.id)} >= {"dev", "test"}
        capsys.readouterr()
        assert main(["trials", name, "--csv", "--storage", postgres_url]) == 0
        assert len(capsys.readouterr().out.splitlines()) == 1 + 12
    finally:
        storage.delete_study(name)


def test_workers_opening_a_new_postgresql_database_together_all_see_the_newest_schema(postgres_url, monkeypatch):
    """CI once saw a worker refused with 'has schema 1, from an older bbpt' on a new server database: it read
    schema_version before another worker's CREATE committed and the studies table after. Each look here is
    followed by a pause so that another worker commits in between, which a busy machine does now and then."""
    import random
    import threading
    import time

    import bbpt.storage as storage_module
    from sqlalchemy import create_engine, make_url, text

    real_inspect = storage_module.inspect

    class SlowInspector:
        def __init__(self, conn):
            self.inner = real_inspect(conn)

        def has_table(self, name):
            found = self.inner.has_table(name)
            time.sleep(random.uniform(0, 0.3))
            return found

    monkeypatch.setattr(storage_module, "inspect", SlowInspector)
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    for round_ in range(4):
        db = f"bbpt_race_{os.getpid()}_{round_}"
        with admin.connect() as c:
            c.execute(text(f"CREATE DATABASE {db}"))
        url = make_url(postgres_url).set(database=db).render_as_string(hide_password=False)
        results, start = [], threading.Barrier(4)

        def open_it():
            start.wait()
            try:
                st = Storage(url)
                results.append(st.schema)
                st.engine.dispose()
            except Exception as e:  # noqa: BLE001 - the assertion below names it
                results.append(e)

        threads = [threading.Thread(target=open_it) for _ in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        with admin.connect() as c:
            c.execute(text(f"DROP DATABASE {db} WITH (FORCE)"))
        assert results == [SCHEMA_VERSION] * 4, results
    admin.dispose()


def test_opening_a_new_file_while_another_process_creates_its_tables_waits(tmp_path):
    """SQLite refuses a journal-mode change at once (no busy wait) while another connection holds the write
    lock of a file still in rollback mode: two workers opening a new database together hit it (CI saw
    'database is locked'). Opening must wait for the lock, as every other statement does."""
    import threading
    import time

    path = tmp_path / "new.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")                       # the other process, mid-way through creating its tables
    other.execute("CREATE TABLE unrelated (x)")
    threading.Timer(0.5, lambda: other.execute("COMMIT")).start()
    t0 = time.monotonic()
    store = Storage(f"sqlite:///{path}")
    assert time.monotonic() - t0 >= 0.4                    # it waited for the lock rather than failing
    with store.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    assert store.get_study("none") is None
    other.close()
