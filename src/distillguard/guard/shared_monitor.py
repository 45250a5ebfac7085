"""``serve --detect CAL`` behind N replicas on one ledger: one of them detects for all.

Each replica's own monitor would see 1/N of an account's requests and of the evidence linking
accounts, and all N would write verdicts. So the in-process monitor takes the ledger's monitor
lease (``guard/lease.py``, the one ``distillguard monitor`` holds) when it starts:

- the **holder** scores every replica's finished requests, read from the ledger by the same
  :class:`~distillguard.guard.detector_service.DetectorService` (feed, checkpoint, lease checks
  before each write) that ``distillguard monitor`` runs, and records the verdicts in the ledger;
- the others **stand by**: they apply the verdicts they read from the ledger, as
  ``--detect external`` replicas do, and look at the lease every ``ttl_s / 3`` seconds. When the
  holder dies (its heartbeat stands still for ``ttl_s``), one of them takes the lease and goes on
  from the holder's checkpoint (``--detect-state``, shared by the replicas), replaying the rows
  the checkpoint had not covered: no evidence is lost and none counted twice. A lease held by a
  ``distillguard monitor`` process counts the same: every replica stands by.

Why the holder reads even its own requests from the ledger rather than its in-memory queue
(the path a single gateway used): one order and one cursor for every row is what makes the
checkpoint exact (a row scored from the queue before the feed reaches it would be replayed after
a takeover), and a second replica arriving changes nothing. The queue is kept for what it was
good at: each finished request of this replica wakes the monitor at once (so a lone gateway's
verdicts come as soon as the row is committed, not a poll later), and its prompt and answer, in
memory, are scored instead of the ledger's copy, which ``--ledger-content hashes|off`` or
``--redact`` may have cut. Other replicas' rows wait for the next poll (``poll_s``) and are
scored as the ledger keeps them.
"""

from __future__ import annotations

import collections
import logging
import pickle
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import InterfaceError, OperationalError

from distillguard.errors import ConfigError
from distillguard.guard.detector_service import (
    Checkpoint,
    DetectorService,
    LedgerFeed,
    Stopped,
    code_fingerprint,
    file_digest,
)
from distillguard.guard.lease import Lease, LeaseLost
from distillguard.guard.schema import LedgerRow
from distillguard.guard.verdicts import Verdicts

log = logging.getLogger(__name__)

_DB_DOWN = (OperationalError, InterfaceError)
MAX_FRESH = 100_000  # own rows held for their ledger row; more means the feed is far behind


class SharedMonitor:
    """The in-process monitor of one replica among N on a ledger; the gateway's ``monitor``
    (``start``, ``put``, ``stop``, ``errors``), as :class:`~distillguard.guard.monitor.MonitorWorker`.

    ``detection`` is the fresh detector built from ``calibration``; ``make`` builds another
    when this replica takes the lease a second time without a checkpoint to load."""

    def __init__(
        self,
        detection,
        verdicts: Verdicts,
        engine: Engine,
        *,
        calibration: str | Path,
        make: Callable[[], object],
        state_dir: str | Path | None,
        ttl_s: float = 15.0,
        poll_s: float = 0.25,
        lag_s: float = 120.0,
        every_s: float = 30.0,
        every_n: int = 10_000,
    ):
        self.verdicts = verdicts
        self.engine = engine
        self.calibration = str(calibration)
        self.make = make
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.poll_s = poll_s
        self.lag_s = lag_s
        self.every_s = every_s
        self.every_n = every_n
        self.lease = Lease(engine, ttl_s=ttl_s)
        self.service: DetectorService | None = None  # set while this replica holds the lease
        self.following: str | None = None  # the holder this replica stands by for
        self._pristine = detection  # not yet fed a row: usable for a tenure without checkpoint
        self._errors = 0  # of tenures past
        self._queue: queue.SimpleQueue[dict | None] = queue.SimpleQueue()
        self._fresh: dict[str, dict] = {}  # this replica's rows awaiting their ledger row
        self._fresh_at: collections.deque[tuple[float, str]] = collections.deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def errors(self) -> int:
        return self._errors + (self.service.errors if self.service is not None else 0)

    @property
    def holding(self) -> bool:
        return self.service is not None

    # ---- the gateway's side ---------------------------------------------------------------

    def start(self) -> None:
        """Look at the lease once (blocking: database reads, perhaps a checkpoint to load), say
        in one line which role this replica has, then follow or stand by in a thread."""
        held, who = self.lease.try_acquire()
        if held:
            where = self._hold()
            log.info(
                "online detection: this replica holds the ledger's monitor lease (as %s) and "
                "scores every replica's requests from the ledger, %s",
                self.lease.holder,
                where,
            )
        else:
            self.following = who
            log.info(
                "online detection: standing by; %s holds the ledger's monitor lease and records "
                "the verdicts this replica applies; taking over if its heartbeat stops for %.0f s",
                who or "nobody (it was just released)",
                self.lease.ttl_s,
            )
        self._thread = threading.Thread(target=self._loop, name="distillguard-monitor", daemon=True)
        self._thread.start()

    def put(self, row: dict) -> None:
        if self.service is not None:  # a standby has nothing to do with its own rows
            self._queue.put(row)

    def stop(self, timeout_s: float = 30) -> None:
        """Score what the ledger holds so far, save the checkpoint, free the lease (blocking:
        call it from a thread)."""
        if self._thread is not None:
            self._stop.set()
            self._queue.put(None)
            self._thread.join(timeout_s)

    # ---- the monitor's thread ---------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self.service is None:
                    self._stand_by()
                else:
                    self._follow()
            except LeaseLost as exc:
                log.error("%s: standing by (the new holder goes on from the checkpoint)", exc)
                self._let_go()
            except Stopped:
                break
            except _DB_DOWN as exc:  # the lease and the feed both need it: wait
                log.warning("online detection: ledger unreachable (%s)", type(exc).__name__)
                self._stop.wait(self.lease.ttl_s / 3)
            except Exception:  # noqa: BLE001 - a bug here must not stop the gateway; retried
                self._errors += 1
                log.exception("online detection failed; retrying in %.1f s", self.poll_s)
                self._stop.wait(self.poll_s)
        if self.service is not None:
            self._finish()

    def _stand_by(self) -> None:
        self._discard_queued()
        held, who = self.lease.try_acquire()
        if held:
            previous = self.following
            where = self._hold()
            log.info(
                "online detection: this replica took the ledger's monitor lease (as %s) from %s "
                "and scores every replica's requests, %s",
                self.lease.holder,
                previous,
                where,
            )
            return
        if who != self.following:
            log.info("online detection: standing by; the monitor lease is held by %s", who)
            self.following = who
        self._stop.wait(self.lease.ttl_s / 3)

    def _follow(self) -> None:
        """Wait for a row of this replica (or ``poll_s``), then score whatever the ledger holds
        that the feed has not read."""
        self.lease.check()  # not renewed for ttl_s: another may hold it now
        self._take_queued(self.poll_s)
        service = self.service
        while True:
            read = service.step(self._stop, self._fresh)
            if service.due():
                service.save()
            if read < service.feed.batch or self._stop.is_set():
                break
            self._take_queued(0)
        self._expire_fresh()

    def _finish(self) -> None:
        """At stop: the rows committed so far, a last checkpoint, the lease freed at once."""
        try:
            self._take_queued(0)
            self.service.step(self._stop, self._fresh)
            self.service.save()
        except (LeaseLost, Stopped) as exc:
            log.warning("online detection stopped without a last checkpoint (%s)", exc)
        except Exception:  # noqa: BLE001 - shutting down: log it, free the lease all the same
            log.exception("online detection failed while stopping")
        finally:
            self.lease.release()

    # ---- holding and letting go -------------------------------------------------------------

    def _hold(self) -> str:
        """Become the holder (the lease just taken): the service that scores the ledger, from
        the checkpoint if there is one. Returns where it starts, for the log. On failure the
        lease is freed (held with no service, no replica would detect) and the error raised."""
        try:
            return self._start_service()
        except BaseException:
            self.lease.release()
            self.lease = Lease(self.engine, ttl_s=self.lease.ttl_s, holder=self.lease.holder)
            raise

    def _start_service(self) -> str:
        detection = self._pristine if self._pristine is not None else self.make()
        self._pristine = None
        feed = LedgerFeed(self.engine, lag_s=self.lag_s)
        checkpoint = None
        if self.state_dir is not None:
            checkpoint = Checkpoint(
                self.state_dir, file_digest(self.calibration), code_fingerprint(detection)
            )
        service = self._service(detection, feed, checkpoint)
        header = None
        try:
            header = service.restore()
        except (ConfigError, pickle.UnpicklingError) as exc:
            # a serving gateway must not refuse to start over detector state: the ledger still
            # holds the evidence, so replay it under this calibration and code
            log.warning("%s; online detection replays the ledger from its first row instead", exc)
            service = self._service(
                detection, LedgerFeed(self.engine, lag_s=self.lag_s), checkpoint
            )
        if header is not None:
            where = (
                f"from the checkpoint in {checkpoint.path} (ledger row {header['cursor']['high']}, "
                f"{header['requests']} requests in the state)"
            )
        elif checkpoint is not None:
            where = f"from the ledger's first row (no checkpoint yet in {checkpoint.path})"
        else:
            # nowhere to keep state: as a lone gateway did, start with what comes next
            with self.engine.connect() as conn:
                top = conn.execute(select(func.max(LedgerRow.id))).scalar()
                rid = conn.execute(select(LedgerRow.request_id).where(LedgerRow.id == top)).scalar()
            feed.high, feed.last_request_id = top or 0, rid
            where = (
                f"from ledger row {feed.high} on, with no checkpoint (no --detect-state): a "
                "replica taking over from this one starts again from the ledger's end"
            )
        self.service = service
        self.following = None
        return where

    def _service(self, detection, feed: LedgerFeed, checkpoint) -> DetectorService:
        return DetectorService(
            detection,
            self.verdicts,
            feed,
            checkpoint,
            poll_s=self.poll_s,
            every_s=self.every_s,
            every_n=self.every_n,
            lease=self.lease,
        )

    def _let_go(self) -> None:
        """The lease went to another monitor: forget this tenure's state (the new holder has the
        checkpoint and the ledger) and stand by, under a new lease object with the same id."""
        self._errors += self.service.errors
        self.service = None
        self.lease.release()  # stops the renewer; deletes nothing that is not ours
        self.lease = Lease(self.engine, ttl_s=self.lease.ttl_s, holder=self.lease.holder)
        self._fresh.clear()
        self._fresh_at.clear()

    # ---- this replica's rows ----------------------------------------------------------------

    def _take_queued(self, timeout_s: float) -> None:
        rows = []
        try:
            rows.append(
                self._queue.get(timeout=timeout_s) if timeout_s > 0 else self._queue.get_nowait()
            )
            while True:
                rows.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        now = time.monotonic()
        for row in rows:
            if row is not None and row.get("request_id"):  # None: stop() waking the thread
                self._fresh[row["request_id"]] = row
                self._fresh_at.append((now, row["request_id"]))

    def _discard_queued(self) -> None:
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass

    def _expire_fresh(self) -> None:
        """Forget own rows whose ledger row never came (a write refused: the client got 503)."""
        now = time.monotonic()
        while self._fresh_at and (
            now - self._fresh_at[0][0] > self.lag_s or len(self._fresh_at) > MAX_FRESH
        ):
            _, rid = self._fresh_at.popleft()
            self._fresh.pop(rid, None)


def default_state_dir(engine: Engine) -> Path | None:
    """``LEDGER.detector`` beside a SQLite ledger file (every replica of a SQLite ledger runs on
    its machine, so they share it); None for an in-memory SQLite or a database server."""
    url = engine.url
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(f"{url.database}.detector")


__all__ = ["SharedMonitor", "default_state_dir"]
