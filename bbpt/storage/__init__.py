"""Storage: the single source of truth for studies, opened from a SQLAlchemy URL.

Every generation is written in one transaction together with the optimizer checkpoint taken after it, so a
process killed at any instant leaves either the whole generation and its checkpoint or neither: a resumed
study repeats no completed trial and loses none.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import random
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, delete, event, func, inspect, select, text, update
from sqlalchemy.exc import DatabaseError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, defer, sessionmaker

from bbpt.errors import StorageError, StudyError
from bbpt.storage.models import (SCHEMA_VERSION, Base, CheckpointRow, EvaluationRow, RequestCacheRow, SchemaVersion,
                                 StudyRow, TrialRow, WorkRow)

__all__ = ["DEFAULT_URL", "Storage", "CheckpointRow", "EvaluationRow", "RequestCache", "RequestCacheRow", "StudyRow",
           "TrialRow", "default_url"]

DEFAULT_URL = "sqlite:///bbpt.db"
SQLITE_TIMEOUT = 60.0    # seconds a SQLite statement waits for another process's lock
SCHEMA_LOCK_KEY = 0x62627074    # PostgreSQL advisory lock taken while creating the schema ('bbpt')
# compact() keeps the z of prompts scored on dev up to this size: a searched z (float32, d <= 4,096), not a
# deep or full-space prompt (~23 kB for input-layer backprop on SmolLM2, ~0.7 MB at every layer)
KEEP_DEV_Z_BYTES = 16384


def default_url() -> str:
    return os.environ.get("BBPT_STORAGE") or DEFAULT_URL


def _sqlite_file(url: str) -> Path | None:
    """The file behind a SQLite URL, plain (sqlite:///x.db) or URI style (sqlite:///file:x.db?mode=ro&uri=true);
    None for in-memory databases."""
    path = url.split("///", 1)[1] if "///" in url else ""
    if path.startswith("file:"):
        path = path[len("file:"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def _nonfinite(value):
    """inf, -inf and NaN as {"__float__": "inf"}: a loss no dev check has set yet is inf, and PostgreSQL's JSON
    (like the JSON standard) has no Infinity token. Older SQLite databases hold the bare token; json.loads
    reads both."""
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if isinstance(value, dict):
        return {k: _nonfinite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nonfinite(v) for v in value]
    return value


def json_dumps(value) -> str:
    return json.dumps(_nonfinite(value), allow_nan=False)


def json_loads(text: str):
    return json.loads(text, object_hook=lambda d: float(d["__float__"]) if d.keys() == {"__float__"} else d)


def _sqlite_wal(cur, wait: float = SQLITE_TIMEOUT) -> None:
    """Readers never block the writer under WAL, so two studies can share a file. SQLite does not call its
    busy handler for a journal-mode change: a process opening a new file while another holds its write lock
    (creating the tables) gets "database is locked" at once. WAL is kept in the file, so retry until the other
    has set it, or the file is free, for as long as any other statement would wait."""
    deadline = time.monotonic() + wait
    while True:
        try:
            if cur.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(random.uniform(0.01, 0.05))


def _sqlite_pragmas(dbapi_conn, _record, wal: bool = True) -> None:
    cur = dbapi_conn.cursor()
    if wal:
        _sqlite_wal(cur)
    cur.execute("PRAGMA synchronous=NORMAL")    # durable at each checkpoint of the WAL, safe against kill -9
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _sqlite_read_only(dbapi_conn, _record) -> None:
    # A viewer's connection: no journal-mode change (that is a write), and SQLite itself refuses any write.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA query_only=ON")
    cur.close()


class Storage:
    """``create=False`` is for commands that only read or delete: a mistyped --storage then fails with a
    message instead of silently creating an empty database. ``read_only=True`` (the dashboard) also makes the
    database refuse writes on every connection, so a viewer can never change or lock what a study writes."""

    def __init__(self, url: str | None = None, *, create: bool = True, read_only: bool = False):
        self.url = url or default_url()
        self.read_only = read_only
        create = create and not read_only
        sqlite = self.url.startswith("sqlite")
        # Whether opening this storage creates its SQLite file: a run refused before its first write removes it.
        self.new_file = self.file is not None and not self.file.exists()
        if sqlite:
            self._check_sqlite_path(create)
        connect_args = {"timeout": SQLITE_TIMEOUT} if sqlite else {}
        if read_only and self.url.startswith("postgresql"):
            connect_args["options"] = "-c default_transaction_read_only=on"
        try:
            self.engine = create_engine(self.url, connect_args=connect_args, pool_pre_ping=not sqlite,
                                        json_serializer=json_dumps, json_deserializer=json_loads)
        except Exception as e:  # bad URL, missing driver
            raise StorageError(f"cannot open storage {self.url!r}: {e}; use a SQLAlchemy URL such as "
                               "sqlite:///bbpt.db or postgresql://user@host/db") from None
        if sqlite:
            # Only a storage that may create and run studies switches the file to WAL (for concurrent workers):
            # commands that read, export or delete leave a committed file's journal mode, and so its bytes, alone.
            event.listen(self.engine, "connect", _sqlite_read_only if read_only else
                         functools.partial(_sqlite_pragmas, wal=create))
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        self._init_schema(create)

    @property
    def file(self) -> Path | None:
        """The SQLite file behind the URL (None for a server database or an in-memory one)."""
        return _sqlite_file(self.url)

    def _check_sqlite_path(self, create: bool) -> None:
        p = self.file
        if p is None:
            return
        # Whether an existing file is a database is left to SQLite ("file is not a database", see _error):
        # opening and closing the file here would drop every POSIX lock this process's SQLite connections
        # hold on it, and another process could then delete the WAL under them and corrupt the database.
        if p.exists():
            return
        if not create:
            raise StorageError(f"--storage {self.url!r}: there is no database at {str(p)!r}; check the path "
                               "(or $BBPT_STORAGE); studies are created by `bbpt optimize`")
        elif not p.parent.exists():
            raise StorageError(f"--storage {self.url!r}: folder {str(p.parent)!r} does not exist; create it first")

    def _init_schema(self, create: bool) -> None:
        for attempt in range(8):
            try:
                return self._create_schema(create)
            except DatabaseError as e:
                # Two processes opening a new database together both find no tables and both create them;
                # the loser's CREATE or INSERT fails, and another pass finds everything in place. The pooled
                # connection may still hold the old schema, so drop it and wait a moment before looking again.
                if attempt < 7 and (isinstance(e, IntegrityError) or "already exists" in str(e)):
                    self.engine.dispose()
                    time.sleep(random.uniform(0.05, 0.3))
                    continue
                raise self._error(e) from None

    def _create_schema(self, create: bool) -> None:
        with self.session() as s, s.begin():
            if create:
                # Look and create under a lock, with the DDL inside the transaction: a process opening the
                # database at the same moment then sees no tables or all of them with their schema version.
                self._lock_now(s)
                if self.engine.dialect.name == "postgresql":
                    # PostgreSQL has no lock that a CREATE TABLE waits on before it looks: workers opening a
                    # new server database together queue here instead (released at commit).
                    s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
            have = inspect(s.connection())
            # The studies table first: under PostgreSQL's READ COMMITTED each statement sees what was committed
            # when it began, and every table is created in one transaction, so once studies is seen the
            # schema_version rows are too. (Looked at the other way round, a database created between the two
            # looks read a version-less schema 1.)
            has_studies = have.has_table(StudyRow.__tablename__)
            if not create and not has_studies:
                raise StorageError(f"storage {self.url!r} holds no bbpt tables; check --storage (or "
                                   "$BBPT_STORAGE); studies are created by `bbpt optimize`")
            rows = (s.scalars(select(SchemaVersion.version)).all()
                    if have.has_table(SchemaVersion.__tablename__) else [])
            if not rows and not has_studies:
                # A new database: every table at the newest schema, stamped for the migrations in the same
                # transaction, so no database has tables but no revision.
                from bbpt.storage.migrate import stamp_head

                Base.metadata.create_all(s.connection())
                s.add(SchemaVersion(version=SCHEMA_VERSION))
                s.flush()
                stamp_head(s.connection())
                rows = [SCHEMA_VERSION]
        self.schema = max(rows, default=1)
        if self.schema > SCHEMA_VERSION:
            raise StorageError(f"database {self.url!r} was written by a newer bbpt (schema {self.schema}, "
                               f"this bbpt knows {SCHEMA_VERSION}); upgrade bbpt, or use another --storage")
        if self.schema < SCHEMA_VERSION and create:
            raise StorageError(
                f"database {self.url!r} has schema {self.schema}, from an older bbpt; this bbpt writes schema "
                f"{SCHEMA_VERSION}. Upgrade it in place with `bbpt storage upgrade --storage {self.url}` (stop "
                "its other workers first; reading it, e.g. `bbpt study report`, works without upgrading)")

    def upgrade(self) -> tuple[str | None, str]:
        """Migrate the database to this bbpt's schema (``bbpt storage upgrade``); returns the revisions
        before and after."""
        from bbpt.storage.migrate import upgrade

        try:
            out = upgrade(self.engine)
        except DatabaseError as e:
            raise self._error(e) from None
        self.schema = SCHEMA_VERSION
        return out

    def fenced(self, lease) -> "Storage":
        """This storage, with every write transaction first checking (and extending) ``lease``: a worker
        whose study was taken over cannot write to it again. Shares the engine: no new connections."""
        other = copy.copy(self)
        other._fence = lease
        return other

    def _error(self, e: DatabaseError) -> StorageError:
        msg = str(e.orig) if getattr(e, "orig", None) else str(e)
        if "file is not a database" in msg and self.file is not None:
            return StorageError(f"--storage {self.url!r}: {self.file} exists but is not a SQLite database; "
                                "point --storage at a new or existing bbpt database file")
        if "readonly" in msg.replace(" ", "").lower():
            hint = "the database (or its folder) is read-only; make it writable or copy it elsewhere"
        elif isinstance(e, OperationalError):
            hint = "check the URL, that the server is up, and permissions"
        elif isinstance(e, IntegrityError):
            hint = "another process is writing the same study; run one process per study"
        else:
            hint = "is it a bbpt database?"
        return StorageError(f"cannot use storage {self.url!r} ({msg}); {hint}")

    _fence = None

    def _lock_now(self, s: Session) -> None:
        """SQLite: take the write lock at the start of the transaction, not at its first write. A transaction
        that reads and then writes needs it: under WAL, one that read before another process wrote can no
        longer write at all. (PostgreSQL locks the rows it reads instead: FOR UPDATE.)"""
        if self.url.startswith("sqlite"):
            s.connection().exec_driver_sql("BEGIN IMMEDIATE")

    @contextmanager
    def _write(self, *, lock_now: bool = False, races: bool = False):
        """A write transaction whose database errors (read-only, locked past the timeout, server gone)
        become a StorageError that names the storage, instead of a traceback. ``lock_now``: see _lock_now;
        ``races=True`` lets an IntegrityError (two processes inserting one row) through to the caller."""
        try:
            with self.session() as s, s.begin():
                if lock_now:
                    self._lock_now(s)
                if self._fence is not None:
                    self._fence.check(s)
                yield s
        except IntegrityError as e:
            if races:
                raise
            raise self._error(e) from None
        except DatabaseError as e:
            raise self._error(e) from None

    def session(self) -> Session:
        return self._session()

    # -- studies --------------------------------------------------------------------------------------------
    def get_study(self, name: str) -> StudyRow | None:
        with self.session() as s:
            return s.scalar(select(StudyRow).where(StudyRow.name == name))

    def require_study(self, name: str) -> StudyRow:
        row = self.get_study(name)
        if row is None:
            known = [r.name for r in self.list_studies()]
            raise StudyError(f"no study named {name!r} in {self.url}; known studies: {known or 'none'} "
                             "(see `bbpt studies list`)")
        return row

    def create_study(self, name: str, config: dict, *, bbpt_version: str, model: str) -> StudyRow:
        with self._write() as s:
            row = StudyRow(name=name, config=config, bbpt_version=bbpt_version, model=model)
            s.add(row)
        return row

    def update_study(self, name: str, **values) -> None:
        with self._write() as s:
            row = s.scalar(select(StudyRow).where(StudyRow.name == name))
            for k, v in values.items():
                setattr(row, k, v)

    def list_studies(self) -> list[StudyRow]:
        with self.session() as s:
            return list(s.scalars(select(StudyRow).order_by(StudyRow.id)))

    def delete_study(self, name: str) -> None:
        row = self.require_study(name)
        with self._write() as s:
            tables = [TrialRow, CheckpointRow, EvaluationRow]
            if inspect(s.connection()).has_table(RequestCacheRow.__tablename__):   # absent in older databases
                tables.append(RequestCacheRow)
            for table in tables:
                s.execute(delete(table).where(table.study_id == row.id))
            s.execute(delete(StudyRow).where(StudyRow.id == row.id))
            if self.schema >= 2:     # its claim goes too, so the study can be run (or queued) afresh
                s.execute(delete(WorkRow).where(WorkRow.name == name))

    def compact(self, keep_dev_z_bytes: int = KEEP_DEV_Z_BYTES) -> tuple[int, int]:
        """Shrink complete studies to what reports, exports and `bbpt eval` read; returns (checkpoints, trials)
        emptied.

        Two things are dropped, both only needed to *continue* a search: the optimizer state (a CMA-ES
        covariance at d = 500 is ~4 MB) and the parameter vector z of every trial but the selected prompt and
        the checkpoint's best (2 kB a trial at d = 500, a 23 kB matrix for backprop on P, ~0.7 MB for a deep
        prompt on SmolLM2's 30 layers). Each trial keeps its loss, metrics, calls, tokens and seconds, and every
        evaluation stays. Once a study is complete, z is read only for the prompt it selected (export, eval,
        the prompt file): reports read scores, and the test curve was scored when the study finished. Deep and
        prefix prompts made the vectors of dev-checked and test-curve prompts most of a results file. A study
        whose summary does not name its selected trial keeps z for every prompt scored on test. This is what
        makes a results database small enough to commit beside its report.

        Prompts scored on dev keep a z of at most ``keep_dev_z_bytes`` (a searched z, 2 kB at d = 500; not a
        deep or full-space prompt): with them a selection rule (a larger dev set, another tie rule) can be
        replayed on a committed study without re-running its search, for ~20 kB a study."""
        with self._write() as s:
            n = s.execute(update(CheckpointRow).where(
                CheckpointRow.study_id.in_(select(StudyRow.id).where(StudyRow.state == "complete")),
                func.length(CheckpointRow.optimizer_state) > 0).values(optimizer_state=b"")).rowcount
            k = 0
            done = s.execute(select(StudyRow.id, StudyRow.summary).where(StudyRow.state == "complete")).all()
            for sid, summary in done:
                keep = set(s.scalars(select(CheckpointRow.best_trial).where(CheckpointRow.study_id == sid)))
                keep |= set(s.scalars(select(TrialRow.number).where(
                    TrialRow.study_id == sid, func.length(TrialRow.z) <= keep_dev_z_bytes,
                    TrialRow.number.in_(select(EvaluationRow.trial_number).where(
                        EvaluationRow.study_id == sid, EvaluationRow.split == "dev")))))
                if (summary or {}).get("selected_trial") is not None:
                    keep.add(summary["selected_trial"])
                else:
                    keep |= set(s.scalars(select(EvaluationRow.trial_number).where(
                        EvaluationRow.study_id == sid, EvaluationRow.split == "test")))
                k += s.execute(update(TrialRow).where(TrialRow.study_id == sid, func.length(TrialRow.z) > 0,
                                                      TrialRow.number.not_in(keep - {None}))
                               .values(z=b"")).rowcount
        if self.url.startswith("sqlite"):       # SQLite keeps freed pages in the file until VACUUM
            with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
                c.exec_driver_sql("VACUUM")
                c.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        return n, k

    # -- the loop's writes ----------------------------------------------------------------------------------
    def commit_generation(self, study_id: int, trials: list[dict], checkpoint: dict,
                          evaluations: list[dict]) -> None:
        """Trials, their evaluations and the checkpoint after them, atomically."""
        with self._write() as s:
            s.add_all(TrialRow(study_id=study_id, **t) for t in trials)
            s.add_all(EvaluationRow(study_id=study_id, **e) for e in evaluations)
            s.add(CheckpointRow(study_id=study_id, **checkpoint))
            # Older checkpoints are never read again; keep the table small.
            s.execute(delete(CheckpointRow).where(CheckpointRow.study_id == study_id,
                                                  CheckpointRow.generation < checkpoint["generation"]))

    def add_evaluations(self, study_id: int, evaluations: list[dict]) -> None:
        with self._write() as s:
            s.add_all(EvaluationRow(study_id=study_id, **e) for e in evaluations)

    def update_evaluation(self, study_id: int, trial_number: int, split: str, metrics: dict) -> None:
        """Add ``metrics`` to the latest evaluation of a trial on a split (a generation prompt's text scores
        join the dev NLL that selected it, rather than standing as a second dev point)."""
        with self._write() as s:
            row = s.scalar(select(EvaluationRow).where(EvaluationRow.study_id == study_id,
                                                        EvaluationRow.trial_number == trial_number,
                                                        EvaluationRow.split == split)
                           .order_by(EvaluationRow.id.desc()).limit(1))
            row.metrics = {**row.metrics, **metrics}

    # -- reads ----------------------------------------------------------------------------------------------
    def last_checkpoint(self, study_id: int) -> CheckpointRow | None:
        with self.session() as s:
            return s.scalar(select(CheckpointRow).where(CheckpointRow.study_id == study_id)
                            .order_by(CheckpointRow.generation.desc()).limit(1))

    def trials(self, study_id: int, *, with_z: bool = True) -> list[TrialRow]:
        """A study's trials in order; ``with_z=False`` leaves the parameter vectors in the database (reports
        read losses and costs only, and z is most of a trial's bytes: 2 kB at d = 500)."""
        query = select(TrialRow).where(TrialRow.study_id == study_id).order_by(TrialRow.number)
        if not with_z:
            query = query.options(defer(TrialRow.z, raiseload=True))
        with self.session() as s:
            return list(s.scalars(query))

    def trial(self, study_id: int, number: int) -> TrialRow | None:
        with self.session() as s:
            return s.scalar(select(TrialRow).where(TrialRow.study_id == study_id, TrialRow.number == number))

    def request_cache(self, study_id: int) -> "RequestCache":
        return RequestCache(self, study_id)

    def evaluations(self, study_id: int) -> list[EvaluationRow]:
        with self.session() as s:
            return list(s.scalars(select(EvaluationRow).where(EvaluationRow.study_id == study_id)
                                  .order_by(EvaluationRow.id)))


class RequestCache:
    """One study's cached API answers, by request hash. Written as answers arrive (not with the generation),
    so even the answers of a generation cut short by a crash are not paid for twice."""

    CHUNK = 500         # keys per SELECT: well under every database's limit on bound parameters

    def __init__(self, storage: Storage, study_id: int):
        self.storage, self.study_id = storage, study_id

    def get_many(self, keys: list[str]) -> dict[str, dict]:
        out: dict[str, dict] = {}
        with self.storage.session() as s:
            for i in range(0, len(keys), self.CHUNK):
                rows = s.execute(select(RequestCacheRow.key, RequestCacheRow.answer).where(
                    RequestCacheRow.study_id == self.study_id, RequestCacheRow.key.in_(keys[i:i + self.CHUNK])))
                out.update((k, a) for k, a in rows)
        return out

    def put_many(self, answers: dict[str, dict]) -> None:
        if not answers:
            return
        have = self.get_many(list(answers))
        with self.storage._write() as s:
            s.add_all(RequestCacheRow(study_id=self.study_id, key=k, answer=a) for k, a in answers.items()
                      if k not in have)
