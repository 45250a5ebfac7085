"""Online detection off the request path: finished requests go to a monitor in a worker thread,
and a verdict that escalates an account is recorded (``guard/verdicts.py``)."""

from __future__ import annotations

import logging
import math
import queue
import threading
from types import SimpleNamespace
from typing import Protocol

from distillguard.guard.ledger import to_traffic
from distillguard.guard.policy import Level
from distillguard.guard.verdicts import Verdicts

log = logging.getLogger(__name__)

MAX_BATCH = 256


class Monitor(Protocol):
    """Online detection, fed every finished request off the request path (a worker thread).

    ``observe`` takes a traffic-log record (DESIGN.md) and returns a verdict (anything with
    ``level`` (a :class:`Level`, its name or number), ``score`` and ``reasons``) or None."""

    def observe(self, record: dict): ...


class MonitorWorker:
    """Feeds ledger rows to ``monitor`` in a daemon thread; ``errors`` counts the batches it
    failed on and the verdicts it refused for a score that is not a finite number (a detector
    bug must stop neither the monitor nor the gateway)."""

    def __init__(self, monitor: Monitor, verdicts: Verdicts):
        self.monitor = monitor
        self.verdicts = verdicts
        self.errors = 0
        self._told_refused = False  # a detector that returns NaN once returns it for every request
        self._queue: queue.SimpleQueue[dict | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="distillguard-monitor", daemon=True)
        self._thread.start()

    def put(self, row: dict) -> None:
        self._queue.put(row)

    def stop(self, timeout_s: float = 30) -> None:
        """Drain what is queued, then stop (blocking: call it from a thread)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout_s)

    def _loop(self) -> None:
        """Feed finished requests to the monitor, in batches of whatever is queued (a monitor
        with ``observe_batch`` embeds a batch of prompts at once); record a verdict when it
        escalates an account."""
        stop = False
        while not stop:
            rows = [self._queue.get()]
            while len(rows) < MAX_BATCH:
                try:
                    rows.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if None in rows:
                stop, rows = True, [r for r in rows if r is not None]
            if not rows:
                continue
            try:
                self._observe(rows)
            except Exception:  # a detector bug must not stop the monitor (or the gateway)
                self.errors += 1
                log.exception(
                    "monitor failed on %d requests from %s", len(rows), rows[0].get("request_id")
                )

    def _observe(self, rows: list[dict]) -> None:
        refused = observe_rows(self.monitor, self.verdicts, rows)
        self.errors += len(refused)
        if refused and not self._told_refused:
            self._told_refused = True
            row, verdict = refused[0]
            log.error(
                "detector %s scored request %s %r, not a finite number: its verdict is not "
                "recorded (a detector error; further ones are counted in "
                "distillguard_monitor_errors_total, not logged)",
                detector_name(self.monitor),
                row.get("request_id"),
                getattr(verdict, "score", None),
            )


def observe_rows(monitor: Monitor, verdicts: Verdicts, rows: list[dict]) -> list[tuple]:
    """Score finished requests (ledger rows, in the order they finished) and record a verdict
    for each that escalates its account: the one step shared by the in-process worker and the
    external follower (``guard/detector_service.py``), so both judge the same way. Returns the
    (row, verdict) pairs refused for a non-finite score (see :func:`escalations`)."""
    return escalations(monitor, verdicts, rows, score(monitor, rows))


def score(monitor: Monitor, rows: list[dict]) -> list:
    """The monitor's verdicts on ``rows`` (in memory only: nothing is recorded)."""
    records = [to_traffic(SimpleNamespace(**{"label": None, **row})) for row in rows]
    if hasattr(monitor, "observe_batch"):
        return monitor.observe_batch(records)
    return [monitor.observe(r) for r in records]


def escalations(
    monitor: Monitor,
    verdicts: Verdicts,
    rows: list[dict],
    results: list,
    holder: str | None = None,
) -> list[tuple]:
    """Record each of ``results`` that raises its account's level (online detection only
    escalates; lowering is an admin's decision), in the name of ``holder`` (the monitor lease's
    holder id, where the monitor holds one).

    A verdict whose score is not a finite number (NaN or infinity from a detector, or not a
    number at all) is a detector error, not evidence: it is not recorded (the database would
    keep NaN, which reads back as null, and JSON cannot carry it) and is returned among the
    (row, verdict) pairs refused, for the caller to count."""
    refused: list[tuple] = []
    for row, verdict in zip(rows, results, strict=False):
        if verdict is None:
            continue
        if not finite_score(getattr(verdict, "score", None)):
            refused.append((row, verdict))
            continue
        level = Level.parse(verdict.level)
        account = row["account_id"]
        if level > verdicts.load_level(account):
            verdicts.record(
                account,
                level,
                score=getattr(verdict, "score", None),
                reasons=list(getattr(verdict, "reasons", []) or []),
                source="online",
                request_id=row["request_id"],
                holder=holder,
            )
    return refused


def finite_score(value) -> bool:
    """Whether ``value`` may be stored as a verdict's score: None (no score) or a finite real."""
    if value is None:
        return True
    if isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except (TypeError, ValueError, OverflowError):  # a string, a complex, an int past a double
        return False


def detector_name(monitor) -> str:
    """The monitor's class, and the detector it wraps if any (``OnlineDetection`` wraps the
    calibrated ``AccountMonitor``; a plugin names its own module)."""

    def name(obj) -> str:
        return f"{type(obj).__module__}.{type(obj).__qualname__}"

    inner = getattr(monitor, "monitor", None)
    return f"{name(monitor)}({name(inner)})" if inner is not None else name(monitor)


__all__ = [
    "Monitor",
    "MonitorWorker",
    "detector_name",
    "escalations",
    "finite_score",
    "observe_rows",
    "score",
]
