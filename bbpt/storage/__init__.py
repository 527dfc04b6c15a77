"""Storage: the single source of truth for studies, opened from a SQLAlchemy URL.

Every generation is written in one transaction together with the optimizer checkpoint taken after it, so a
process killed at any instant leaves either the whole generation and its checkpoint or neither: a resumed
study repeats no completed trial and loses none.
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import create_engine, delete, event, select
from sqlalchemy.exc import DatabaseError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from bbpt.errors import StorageError, StudyError
from bbpt.storage.models import (SCHEMA_VERSION, Base, CheckpointRow, EvaluationRow, SchemaVersion, StudyRow,
                                 TrialRow)

__all__ = ["DEFAULT_URL", "Storage", "CheckpointRow", "EvaluationRow", "StudyRow", "TrialRow", "default_url"]

DEFAULT_URL = "sqlite:///bbpt.db"


def default_url() -> str:
    return os.environ.get("BBPT_STORAGE") or DEFAULT_URL


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")      # readers never block the writer; two studies can share a file
    cur.execute("PRAGMA synchronous=NORMAL")    # durable at each checkpoint of the WAL, safe against kill -9
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


class Storage:
    def __init__(self, url: str | None = None):
        self.url = url or default_url()
        sqlite = self.url.startswith("sqlite")
        if sqlite:
            self._check_sqlite_path()
        try:
            self.engine = create_engine(self.url, connect_args={"timeout": 60} if sqlite else {},
                                        pool_pre_ping=not sqlite)
        except Exception as e:  # bad URL, missing driver
            raise StorageError(f"cannot open storage {self.url!r}: {e}; use a SQLAlchemy URL such as "
                               "sqlite:///bbpt.db or postgresql://user@host/db") from None
        if sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        self._init_schema()

    def _check_sqlite_path(self) -> None:
        path = self.url.split("///", 1)[-1] if "///" in self.url else ""
        if not path or path == ":memory:":
            return
        p = Path(path)
        if p.exists():
            head = p.read_bytes()[:16]
            if head and not head.startswith(b"SQLite format 3"):
                raise StorageError(f"--storage {self.url!r}: {p} exists but is not a SQLite database; "
                                   "point --storage at a new or existing bbpt database file")
        elif not p.parent.exists():
            raise StorageError(f"--storage {self.url!r}: folder {str(p.parent)!r} does not exist; create it first")

    def _init_schema(self) -> None:
        try:
            Base.metadata.create_all(self.engine)
            with self._session() as s, s.begin():
                rows = s.scalars(select(SchemaVersion.version)).all()
                if not rows:
                    s.add(SchemaVersion(version=SCHEMA_VERSION))
                elif max(rows) > SCHEMA_VERSION:
                    raise StorageError(f"database {self.url!r} was written by a newer bbpt (schema {max(rows)}, "
                                       f"this bbpt knows {SCHEMA_VERSION}); upgrade bbpt, or use another --storage")
        except OperationalError as e:
            msg = str(e.orig) if getattr(e, "orig", None) else str(e)
            hint = ("the file or its folder is read-only; make it writable or copy it elsewhere"
                    if "readonly" in msg.replace(" ", "").lower() else "check the URL and permissions")
            raise StorageError(f"cannot use storage {self.url!r} ({msg}); {hint}") from None
        except DatabaseError as e:
            raise StorageError(f"cannot use storage {self.url!r} ({e.orig}); is it a bbpt database?") from None

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
        with self.session() as s, s.begin():
            row = StudyRow(name=name, config=config, bbpt_version=bbpt_version, model=model)
            s.add(row)
        return row

    def update_study(self, name: str, **values) -> None:
        with self.session() as s, s.begin():
            row = s.scalar(select(StudyRow).where(StudyRow.name == name))
            for k, v in values.items():
                setattr(row, k, v)

    def list_studies(self) -> list[StudyRow]:
        with self.session() as s:
            return list(s.scalars(select(StudyRow).order_by(StudyRow.id)))

    def delete_study(self, name: str) -> None:
        row = self.require_study(name)
        with self.session() as s, s.begin():
            for table in (TrialRow, CheckpointRow, EvaluationRow):
                s.execute(delete(table).where(table.study_id == row.id))
            s.execute(delete(StudyRow).where(StudyRow.id == row.id))

    # -- the loop's writes ----------------------------------------------------------------------------------
    def commit_generation(self, study_id: int, trials: list[dict], checkpoint: dict,
                          evaluations: list[dict]) -> None:
        """Trials, their evaluations and the checkpoint after them, atomically."""
        with self.session() as s, s.begin():
            s.add_all(TrialRow(study_id=study_id, **t) for t in trials)
            s.add_all(EvaluationRow(study_id=study_id, **e) for e in evaluations)
            s.add(CheckpointRow(study_id=study_id, **checkpoint))
            # Older checkpoints are never read again; keep the table small.
            s.execute(delete(CheckpointRow).where(CheckpointRow.study_id == study_id,
                                                  CheckpointRow.generation < checkpoint["generation"]))

    def add_evaluations(self, study_id: int, evaluations: list[dict]) -> None:
        with self.session() as s, s.begin():
            s.add_all(EvaluationRow(study_id=study_id, **e) for e in evaluations)

    # -- reads ----------------------------------------------------------------------------------------------
    def last_checkpoint(self, study_id: int) -> CheckpointRow | None:
        with self.session() as s:
            return s.scalar(select(CheckpointRow).where(CheckpointRow.study_id == study_id)
                            .order_by(CheckpointRow.generation.desc()).limit(1))

    def trials(self, study_id: int) -> list[TrialRow]:
        with self.session() as s:
            return list(s.scalars(select(TrialRow).where(TrialRow.study_id == study_id).order_by(TrialRow.number)))

    def trial(self, study_id: int, number: int) -> TrialRow | None:
        with self.session() as s:
            return s.scalar(select(TrialRow).where(TrialRow.study_id == study_id, TrialRow.number == number))

    def evaluations(self, study_id: int) -> list[EvaluationRow]:
        with self.session() as s:
            return list(s.scalars(select(EvaluationRow).where(EvaluationRow.study_id == study_id)
                                  .order_by(EvaluationRow.id)))
