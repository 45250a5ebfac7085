"""Online detection off the request path: finished requests go to a monitor in a worker thread,
and a verdict that escalates an account is recorded (``guard/verdicts.py``)."""

from __future__ import annotations

import logging
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
    failed on (a detector bug must stop neither the monitor nor the gateway)."""

    def __init__(self, monitor: Monitor, verdicts: Verdicts):
        self.monitor = monitor
        self.verdicts = verdicts
        self.errors = 0
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
        observe_rows(self.monitor, self.verdicts, rows)


def observe_rows(monitor: Monitor, verdicts: Verdicts, rows: list[dict]) -> None:
    """Score finished requests (ledger rows, in the order they finished) and record a verdict
    for each that escalates its account: the one step shared by the in-process worker and the
    external follower (``guard/detector_service.py``), so both judge the same way."""
    escalations(monitor, verdicts, rows, score(monitor, rows))


def score(monitor: Monitor, rows: list[dict]) -> list:
    """The monitor's verdicts on ``rows`` (in memory only: nothing is recorded)."""
    records = [to_traffic(SimpleNamespace(**{"label": None, **row})) for row in rows]
    if hasattr(monitor, "observe_batch"):
        return monitor.observe_batch(records)
    return [monitor.observe(r) for r in records]


def escalations(monitor: Monitor, verdicts: Verdicts, rows: list[dict], results: list) -> None:
    """Record each of ``results`` that raises its account's level (online detection only
    escalates; lowering is an admin's decision)."""
    for row, verdict in zip(rows, results, strict=False):
        if verdict is None:
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
            )


__all__ = ["Monitor", "MonitorWorker", "escalations", "observe_rows", "score"]
