"""One monitor per ledger: the ``leases`` row that ``distillguard monitor`` holds while it runs
(the detector service, ``guard/detector_service.py``, checks it before each write)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import Engine, delete, insert, select, update
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError

from distillguard.errors import ConfigError, IncompleteError
from distillguard.guard.schema import Lease as LeaseRow

log = logging.getLogger(__name__)

_DB_DOWN = (OperationalError, InterfaceError)


def _holder_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Lease:
    """The ledger's ``leases`` row for one job (``monitor``): at most one process holds it.

    Two monitors on one ledger would each record every verdict and overwrite each other's
    checkpoints, so a second one is refused while the first is alive, and takes over once the
    first has died. Alive means its heartbeat moves: the holder bumps ``beat`` every ``ttl_s / 3``
    seconds from a thread of its own (scoring a large batch must not stop it). A contender reads
    the row, and takes the lease over only once it has watched the beat stand still for the
    holder's ``ttl_s`` on its *own* monotonic clock, by a compare-and-set on (holder, beat). Why a
    counter and not timestamps: the contender and the holder may be different machines, and
    comparing their wall clocks (or the database's, which SQLite does not have to the second)
    would let a skewed clock steal a live lease. It is one row and plain UPDATEs, so SQLite and
    PostgreSQL behave the same (an advisory lock would be PostgreSQL's alone).

    The holder fences itself: :meth:`held` is false once its last successful renewal began
    ``ttl_s`` ago, which is before any contender can have taken over (the contender's wait starts
    no earlier than that renewal's commit). The monitor checks it before each verdict write and
    each checkpoint, so after a takeover the old holder writes at most the batch it was in.
    """

    engine: Engine
    name: str = "monitor"
    ttl_s: float = 15.0
    holder: str = field(default_factory=_holder_id)
    lost_to: str | None = None  # set when a renewal found another holder in the row
    _renewed: float = float("-inf")  # monotonic start of the last successful renewal
    _thread: threading.Thread | None = None
    _halt: threading.Event = field(default_factory=threading.Event)
    _watched: tuple | None = None  # (holder, beat, monotonic time first seen) of another holder

    def _row(self, conn):
        return conn.execute(select(LeaseRow.__table__).where(LeaseRow.name == self.name)).first()

    def acquire(
        self,
        stop: threading.Event,
        *,
        wait: bool = False,
        on_wait: Callable[[str], None] | None = None,
    ) -> bool:
        """Take the lease (then keep it renewed until :meth:`release`); False if ``stop`` was set
        first. Without ``wait``, a holder whose heartbeat is seen to move is refused with a
        :class:`ConfigError` naming it; a stale one is taken over either way."""
        told = False
        while not stop.is_set():
            started = time.monotonic()
            got, row = self._attempt(started, refuse_live=not wait)
            if got:
                return True
            # without --wait, say something only once the holder looks dead (a live one moves
            # its beat every ttl/3 and is refused in one line)
            watched = self._watched
            if row is not None and on_wait and not told:
                if wait or (watched is not None and started - watched[2] >= row.ttl_s / 2):
                    told = True
                    on_wait(self._waiting_message(row, wait))
            stop.wait(min(1.0, row.ttl_s / 6) if row is not None else 0.05)
        return False

    def try_acquire(self) -> tuple[bool, str | None]:
        """One look at the lease, without waiting: (held, the holder's id). Once held, it is kept
        renewed. Called again every so often, it takes over a holder whose heartbeat has stood
        still for the holder's ``ttl_s`` between calls (``serve --detect``'s standby replicas,
        guard/shared_monitor.py)."""
        got, row = self._attempt(time.monotonic(), refuse_live=False)
        if got:
            return True, self.holder
        if row is None:  # another contender inserted the row first
            with self.engine.connect() as conn:
                row = self._row(conn)
        return False, getattr(row, "holder", None)

    def _attempt(self, started: float, *, refuse_live: bool) -> tuple[bool, object]:
        """One step of watching the row: (taken, the row as read)."""
        watched = self._watched  # (holder, beat, monotonic time first seen)
        with self.engine.begin() as conn:
            row = self._row(conn)
            if row is None:
                got = None  # inserted below, in a transaction of its own
            elif watched is None or watched[:2] != (row.holder, row.beat):
                if watched is not None and watched[0] == row.holder and refuse_live:
                    raise ConfigError(self._held_message(row))
                self._watched, got = (row.holder, row.beat, started), False
            elif started - watched[2] >= row.ttl_s:
                got = self._take_over(conn, row)
                if not got:
                    self._watched = None
            else:
                got = False
        if got is None:
            got = self._insert()
        if got:
            self._watched = None
            self._renewed = started
            self.lost_to = None
            self._halt = threading.Event()
            self._thread = threading.Thread(target=self._keep, name="lease", daemon=True)
            self._thread.start()
        return got, row

    def _insert(self) -> bool:
        now = time.time()
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(LeaseRow).values(
                        name=self.name,
                        holder=self.holder,
                        beat=0,
                        ttl_s=self.ttl_s,
                        acquired_at=now,
                        renewed_at=now,
                    )
                )
        except IntegrityError:  # another contender inserted it first: watch that one
            return False
        return True

    def _take_over(self, conn, row) -> bool:
        now = time.time()
        taken = conn.execute(
            update(LeaseRow)
            .where(
                LeaseRow.name == self.name,
                LeaseRow.holder == row.holder,
                LeaseRow.beat == row.beat,
            )
            .values(holder=self.holder, beat=0, ttl_s=self.ttl_s, acquired_at=now, renewed_at=now)
        ).rowcount
        if taken:
            log.warning(
                "took over the %s lease from %s (no heartbeat for %.0f s; last renewed %s)",
                self.name,
                row.holder,
                row.ttl_s,
                _utc(row.renewed_at),
            )
        return bool(taken)

    def _held_message(self, row) -> str:
        return (
            f"this ledger is already followed by monitor {row.holder} (holds the {self.name} "
            f"lease since {_utc(row.acquired_at)}, heartbeat moving): one monitor per ledger. "
            "Stop that one first, or pass --wait to take over when it stops"
        )

    def _waiting_message(self, row, wait: bool) -> str:
        if wait:
            return (
                f"waiting for monitor {row.holder} (holds the {self.name} lease since "
                f"{_utc(row.acquired_at)}) to stop"
            )
        return (
            f"monitor {row.holder} holds the {self.name} lease (last renewed "
            f"{_utc(row.renewed_at)}); watching its heartbeat for up to {row.ttl_s:.0f} s "
            "before taking over"
        )

    def _keep(self) -> None:
        while not self._halt.wait(self.ttl_s / 3):
            started = time.monotonic()
            try:
                with self.engine.begin() as conn:
                    renewed = conn.execute(
                        update(LeaseRow)
                        .where(LeaseRow.name == self.name, LeaseRow.holder == self.holder)
                        .values(beat=LeaseRow.beat + 1, renewed_at=time.time())
                    ).rowcount
                    holder = None if renewed else getattr(self._row(conn), "holder", None)
            except _DB_DOWN as exc:
                log.warning("could not renew the %s lease (%s)", self.name, type(exc).__name__)
                continue
            if not renewed:
                self.lost_to = holder or "nobody (the lease row was deleted)"
                log.error("lost the %s lease to %s", self.name, self.lost_to)
                return
            self._renewed = started

    def held(self) -> bool:
        return self.lost_to is None and time.monotonic() - self._renewed < self.ttl_s

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless the lease is still ours."""
        if not self.held():
            raise LeaseLost(
                f"lost the {self.name} lease to {self.lost_to}"
                if self.lost_to
                else f"could not renew the {self.name} lease for {self.ttl_s:.0f} s"
            )

    def release(self) -> None:
        """Stop renewing and free the row (if still ours), so the next monitor starts at once."""
        self._halt.set()
        if self._thread is not None:
            self._thread.join()
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    delete(LeaseRow).where(
                        LeaseRow.name == self.name, LeaseRow.holder == self.holder
                    )
                )
        except _DB_DOWN:  # it goes stale and is taken over after ttl_s instead
            log.warning(
                "could not release the %s lease; it expires in %.0f s", self.name, self.ttl_s
            )


class LeaseLost(IncompleteError):
    """Another monitor holds the ledger's lease now: stop without writing the state (the holder's
    checkpoint stands; a rerun with --wait resumes when that one stops)."""
