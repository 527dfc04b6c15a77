"""Claims and leases: how any number of workers share one storage's studies, none ever run twice at once.

The database is the coordinator (as Optuna's is): a worker claims a study by writing its name on the study's
row of the ``work`` table together with a lease (a deadline, Unix seconds), renews the lease while it runs, and
clears it when it stops. A lease that lapsed means its worker died; any other worker may then take the study
over, and resumes it from its last stored generation like any resume. Each write the study makes checks, in
its own transaction, that the lease is still this worker's (the fence): a worker that stalled past its lease
and was taken over cannot write another trial.

A claim reads and then writes, so it must not race: PostgreSQL locks the row it reads (``FOR UPDATE``;
``SKIP LOCKED`` where any pending row will do), and SQLite takes its write lock up front (``BEGIN
IMMEDIATE``), which serializes the processes of one host. SQLite's locks do not work across a network file
system: SQLite is for workers on one host, PostgreSQL for many.

Leases compare clocks of different machines; keep them in sync (NTP) to well within the lease (60 s).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import inspect, or_, select, update
from sqlalchemy.exc import IntegrityError

from bbpt.errors import StorageError
from bbpt.storage.models import WorkRow

log = logging.getLogger(__name__)

LEASE_SECONDS = 60.0


def lease_seconds() -> float:
    """The lease length: $BBPT_LEASE_SECONDS, else 60 s (how long a dead worker's study waits for a taker)."""
    raw = os.environ.get("BBPT_LEASE_SECONDS")
    try:
        value = float(raw) if raw else LEASE_SECONDS
    except ValueError:
        value = -1.0
    if not value > 0:
        raise StorageError(f"BBPT_LEASE_SECONDS={raw!r} should be a positive number of seconds, e.g. 60")
    return value


def worker_id() -> str:
    """host:pid plus a random tag, so a new process that reuses a dead one's pid is not taken for it."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"


@dataclass(frozen=True)
class SpecSource:
    """What a worker needs to rebuild a study from the database alone: the spec's name, path and TOML."""

    name: str
    path: str
    text: str


class LeaseLost(StorageError):
    """This worker's lease on a study lapsed and another worker holds it now; this one must stop writing."""


class Lease:
    """One worker's hold on one study."""

    def __init__(self, work: "Work", name: str):
        self.work, self.name = work, name
        self.lost = False

    @property
    def worker(self) -> str:
        return self.work.worker

    def _mine(self):
        return (WorkRow.name == self.name, WorkRow.worker == self.worker, WorkRow.state == "pending")

    def check(self, s) -> None:
        """The fence, run inside another write transaction: extend the lease, or fail that transaction."""
        n = s.execute(update(WorkRow).where(*self._mine())
                      .values(lease_until=time.time() + self.work.seconds)).rowcount
        if n != 1:
            self.lost = True
            holder = s.scalar(select(WorkRow.worker).where(WorkRow.name == self.name))
            raise LeaseLost(f"study {self.name!r}: this worker ({self.worker}) lost its lease, and "
                            f"{holder or 'no worker'} holds it now; nothing more was written. The lease is "
                            f"{self.work.seconds:.0f} s ($BBPT_LEASE_SECONDS); a worker that stalls longer "
                            "(a suspended process, a long blocking call) is taken over")

    def renew(self) -> bool:
        with self.work._txn() as s:
            try:
                self.check(s)
            except LeaseLost:
                return False
        return True

    def release(self, state: str = "pending") -> None:
        """Give the study back: ``pending`` (interrupted: any worker may take it at once), ``done`` or
        ``failed`` (finished; only a new run or queue makes it pending again)."""
        now = time.time()
        with self.work._txn() as s:
            s.execute(update(WorkRow).where(*self._mine()).values(
                worker=None, lease_until=0.0, state=state, finished_at=None if state == "pending" else now))

    @contextmanager
    def kept(self):
        """Renew the lease from a background thread (every third of its length) while the block runs. If
        the block raises (Ctrl-C included) the lease is released as pending, so another worker need not wait
        for it to lapse; otherwise the caller releases it, saying how the study ended."""
        stop = threading.Event()

        def renew():
            while not stop.wait(self.work.seconds / 3):
                try:
                    if not self.renew():
                        log.warning("lost the lease on %s; its next write will stop it", self.name)
                        return
                except StorageError as e:       # the database is unreachable for a moment: try again
                    log.warning("could not renew the lease on %s: %s", self.name, e)

        thread = threading.Thread(target=renew, name=f"lease:{self.name}", daemon=True)
        thread.start()
        try:
            yield self
        except BaseException:
            stop.set()
            thread.join()
            if not self.lost:
                try:
                    self.release("pending")
                except StorageError as e:
                    log.warning("could not release %s (its lease lapses in %.0f s): %s", self.name,
                                self.work.seconds, e)
            raise
        finally:
            stop.set()
            thread.join()


class Work:
    """The work table of one storage, as seen by one worker."""

    def __init__(self, storage, worker: str | None = None, seconds: float | None = None):
        self.storage = storage
        self.worker = worker or worker_id()
        self.seconds = seconds or lease_seconds()

    @property
    def available(self) -> bool:
        """False for a database from before the work table (read-only commands still open those)."""
        return inspect(self.storage.engine).has_table(WorkRow.__tablename__)

    def _txn(self, races: bool = False):
        """A claim's transaction: it reads, then writes, so it takes SQLite's write lock at once; never fenced
        (this is the table the fence reads)."""
        return self.storage._write(lock_now=True, races=races)

    def _take(self, row: WorkRow, now: float) -> Lease:
        row.worker, row.lease_until, row.claimed_at = self.worker, now + self.seconds, now
        row.state, row.finished_at, row.runs = "pending", None, (row.runs or 0) + 1
        return Lease(self, row.name)

    def claim(self, name: str, source: SpecSource) -> Lease | None:
        """Claim one study by name (creating its work row), or None while another worker's lease on it runs."""
        now = time.time()
        try:
            with self._txn(races=True) as s:
                row = s.scalar(select(WorkRow).where(WorkRow.name == name).with_for_update())
                if row is None:
                    row = WorkRow(name=name, spec_name=source.name, spec_path=source.path, spec_text=source.text)
                    s.add(row)
                elif row.worker not in (None, self.worker) and row.lease_until > now:
                    return None
                else:
                    row.spec_name, row.spec_path, row.spec_text = source.name, source.path, source.text
                return self._take(row, now)
        except IntegrityError:      # PostgreSQL: another worker inserted the same row a moment before
            return None

    def claim_next(self) -> tuple[WorkRow, Lease] | None:
        """Claim the oldest pending study nobody holds (queued, or left by a dead worker), or None."""
        now = time.time()
        with self._txn() as s:
            row = s.scalar(select(WorkRow)
                           .where(WorkRow.state == "pending", or_(WorkRow.worker.is_(None), WorkRow.lease_until < now))
                           .order_by(WorkRow.id).limit(1).with_for_update(skip_locked=True))
            if row is None:
                return None
            lease = self._take(row, now)
        return row, lease

    def enqueue(self, names: list[str], source: SpecSource, config: dict | None = None) -> int:
        """Queue studies for ``bbpt worker``s: new rows, and finished ones made pending again; studies a worker
        holds are left to it. ``config`` queues one `bbpt optimize` study instead of a spec's. Returns how
        many were queued."""
        added = 0
        with self._txn() as s:
            rows = {r.name: r for r in s.scalars(select(WorkRow).where(WorkRow.name.in_(names)))}
            for name in names:
                row = rows.get(name)
                if row is None:
                    s.add(WorkRow(name=name, spec_name=source.name, spec_path=source.path, spec_text=source.text,
                                  config=config))
                elif row.state != "pending":
                    row.state, row.finished_at = "pending", None
                    row.spec_name, row.spec_path, row.spec_text = source.name, source.path, source.text
                    row.config = config
                else:
                    continue
                added += 1
        return added

    def rows(self, names: list[str] | None = None) -> dict[str, WorkRow]:
        if not self.available:
            return {}
        query = select(WorkRow).order_by(WorkRow.id)
        if names is not None:
            query = query.where(WorkRow.name.in_(names))
        with self.storage.session() as s:
            return {r.name: r for r in s.scalars(query)}


def holder(row: WorkRow | None, now: float | None = None) -> str | None:
    """'worker, lease 42 s left' for a study a live worker holds; None otherwise."""
    now = time.time() if now is None else now
    if row is None or row.worker is None or row.state != "pending" or row.lease_until <= now:
        return None
    return f"{row.worker}, lease {row.lease_until - now:.0f} s left"
