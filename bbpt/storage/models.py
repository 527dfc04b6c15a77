"""SQLAlchemy 2 tables: studies, trials, checkpoints, evaluations, request_cache, work, schema_version.

The schema changes only through the Alembic migrations in ``bbpt/storage/migrations``; a new database is
created from these classes and stamped at the newest migration. Tables an older bbpt does not know change
what it may safely do (two old workers would not see each other's claims), so every migration raises
SCHEMA_VERSION and an older bbpt refuses the database with a message.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# The schema a database written by this bbpt has; migration N sets it to N. Schema 1 is what bbpt wrote
# before it had migrations (the Alembic baseline).
SCHEMA_VERSION = 2


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class SchemaVersion(Base):
    __tablename__ = "schema_version"
    version: Mapped[int] = mapped_column(Integer, primary_key=True)


class StudyRow(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    config: Mapped[dict] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(20), default="running")   # running | complete | failed
    bbpt_version: Mapped[str] = mapped_column(String(40))
    model: Mapped[str] = mapped_column(String(400))
    summary: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, onupdate=_now)
    trials: Mapped[list["TrialRow"]] = relationship(cascade="all, delete-orphan", passive_deletes=True)
    checkpoints: Mapped[list["CheckpointRow"]] = relationship(cascade="all, delete-orphan", passive_deletes=True)
    evaluations: Mapped[list["EvaluationRow"]] = relationship(cascade="all, delete-orphan", passive_deletes=True)
    requests: Mapped[list["RequestCacheRow"]] = relationship(cascade="all, delete-orphan", passive_deletes=True)


class TrialRow(Base):
    __tablename__ = "trials"
    __table_args__ = (UniqueConstraint("study_id", "number"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    generation: Mapped[int] = mapped_column(Integer)
    z: Mapped[bytes] = mapped_column(LargeBinary)          # float32, little-endian
    loss: Mapped[float] = mapped_column(Float)
    metrics: Mapped[dict] = mapped_column(JSON)
    calls: Mapped[int] = mapped_column(Integer, default=1)
    tokens: Mapped[int] = mapped_column(Integer, default=0)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    backward_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    state: Mapped[str] = mapped_column(String(20), default="complete")
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class CheckpointRow(Base):
    __tablename__ = "checkpoints"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    generation: Mapped[int] = mapped_column(Integer)
    optimizer_state: Mapped[bytes] = mapped_column(LargeBinary)
    loop_state: Mapped[dict] = mapped_column(JSON)
    best_trial: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class EvaluationRow(Base):
    __tablename__ = "evaluations"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    trial_number: Mapped[int | None] = mapped_column(Integer, nullable=True)   # None: the manual prompt
    split: Mapped[str] = mapped_column(String(10))
    metrics: Mapped[dict] = mapped_column(JSON)
    calls_at: Mapped[int] = mapped_column(Integer, default=0)
    seconds_at: Mapped[float] = mapped_column(Float, default=0.0)
    tokens: Mapped[int] = mapped_column(Integer, default=0)
    note: Mapped[str] = mapped_column(Text, default="")


class RequestCacheRow(Base):
    """An API's answer to one request of a study, by a hash of the request: what a resumed (or repeated)
    study reads instead of paying for the same request again."""

    __tablename__ = "request_cache"
    __table_args__ = (UniqueConstraint("study_id", "key"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    key: Mapped[str] = mapped_column(String(64))            # sha256 of the canonical request
    answer: Mapped[dict] = mapped_column(JSON)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class WorkRow(Base):
    """One study a worker can claim, by the study's name, with the spec that declares it (its TOML text, so a
    worker on any machine can rebuild the study from the database alone: the database is the queue).

    ``worker`` and ``lease_until`` (Unix seconds) say who runs it and until when; the worker renews the lease
    while it runs, and a lease that lapsed (its worker died) is free for any other to take over, resuming
    from the last stored generation. ``state`` is pending until the study ends (done or failed).
    """

    __tablename__ = "work"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    spec_name: Mapped[str] = mapped_column(String(200))
    spec_path: Mapped[str] = mapped_column(String(1000))    # as given when queued: messages and runs_dir
    spec_text: Mapped[str] = mapped_column(Text)
    # A single `bbpt optimize --queue` study instead of a spec's: {"study": StudyConfig.to_dict(), "runs_dir"}.
    config: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    state: Mapped[str] = mapped_column(String(20), default="pending")      # pending | done | failed
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease_until: Mapped[float] = mapped_column(Float, default=0.0)
    claimed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    runs: Mapped[int] = mapped_column(Integer, default=0)     # times claimed: a takeover adds one
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
