"""The last step of every request: its metrics, its ledger row (committed before the answer
completes) and, for requests that got an answer, online detection."""

from __future__ import annotations

import time

from distillguard.errors import APIError
from distillguard.guard.idempotency import Claims
from distillguard.guard.ledger import Ledger, LedgerUnavailable
from distillguard.guard.metrics import Metrics
from distillguard.guard.monitor import MonitorWorker
from distillguard.guard.privacy import LedgerPrivacy
from distillguard.guard.requestlog import RequestLog


class Recorder:
    def __init__(
        self,
        ledger: Ledger,
        privacy: LedgerPrivacy,
        metrics: Metrics,
        claims: Claims,
        monitor: MonitorWorker | None = None,
    ):
        self.ledger = ledger
        self.privacy = privacy
        self.metrics = metrics
        self.claims = claims
        self.monitor = monitor

    def unavailable(self) -> APIError | None:
        """The 503 to answer every request with while the ledger cannot take rows, else None:
        refusing at once beats running a generation whose record would hang or be lost."""
        problem = self.ledger.problem()
        return (
            None
            if problem is None
            else LedgerUnavailable(
                f"{problem}; the gateway refuses requests until it recovers (see the server log)"
            )
        )

    async def finish(self, log: RequestLog) -> None:
        """Commit the request's ledger row; only then may its response complete.

        Requests without a valid key are counted in the metrics but not written to the ledger:
        a flood of unauthenticated requests must not be able to fill the database.
        """
        self._observe(log)
        if log.key is None:
            return
        row = log.row()
        await self.ledger.record(self._ledger_row(log, row), idempotent=self.claims.settle(log))
        if self.monitor is not None and log.status == 200:
            self.monitor.put(row)

    def abandon(self, log: RequestLog) -> None:
        """Record a request whose client went away, without waiting (we may be cancelled).

        One that got tokens goes to online detection too: a harvester that always hangs up a
        token early must not be invisible to it."""
        self._observe(log)
        if log.key is not None:
            row = log.row()
            self.ledger.submit(self._ledger_row(log, row), idempotent=self.claims.settle(log))
            if self.monitor is not None and log.completion_tokens:
                self.monitor.put(row)

    def _ledger_row(self, log: RequestLog, row: dict) -> dict:
        """``row`` as the ledger stores it (``--ledger-content``, ``--redact``: guard/privacy.py).
        Online detection is fed ``row`` itself, in memory: what it sees does not depend on this."""
        return self.privacy.row(row, [log.texts[i] for i in sorted(log.texts)])

    def _observe(self, log: RequestLog) -> None:
        self.metrics.observe(
            status=log.status,
            account=log.key.account if log.key else None,
            prompt_tokens=log.prompt_tokens,
            completion_tokens=log.completion_tokens,
            seconds=time.perf_counter() - log.t0,
        )


__all__ = ["Recorder"]
