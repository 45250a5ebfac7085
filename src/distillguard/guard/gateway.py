"""The guard: keys, limits, verdicts, watermarks, idempotency and the ledger, built from one
:class:`GuardConfig`, started and closed together.

Each part has one job and its own module; the request path that drives them, in order, is
``distillguard.pipeline``::

    auth        guard/auth.py          who is calling (401 without a valid, active key)
    policing    guard/verdicts.py      the account's verdict applied (block, cap logprobs, ...)
    claims      guard/idempotency.py   Idempotency-Key replays, across replicas
    limits      guard/admission.py     tokens and dollars reserved up front, settled after (429)
    watermarks  guard/watermarks.py    each account's watermark key; the canary secret
    recorder    guard/recorder.py      metrics and the ledger row, then online detection
    monitor     guard/monitor.py       online detection in a worker thread; with a
                shared_monitor.py      calibration, one replica's for all on the ledger

``serve --no-guard`` runs the pipeline without them.
"""

from __future__ import annotations

import asyncio

from distillguard.guard.admission import Admission, Admitter, LimiterUnavailable, key_scope
from distillguard.guard.auth import Authenticator, AuthError, PermissionDenied, bearer
from distillguard.guard.config import GuardConfig
from distillguard.guard.db import make_engine, migrate
from distillguard.guard.idempotency import Claims, IdempotencyConflict, IdempotencyInProgress
from distillguard.guard.keys import KeyStore
from distillguard.guard.ledger import Ledger
from distillguard.guard.limits import make_limiter
from distillguard.guard.metrics import Metrics
from distillguard.guard.monitor import Monitor, MonitorWorker
from distillguard.guard.policy import PolicyConfig
from distillguard.guard.privacy import LedgerPrivacy
from distillguard.guard.recorder import Recorder
from distillguard.guard.requestlog import RequestLog
from distillguard.guard.shared_monitor import SharedMonitor, default_state_dir
from distillguard.guard.verdicts import AccountBlocked, Verdicts
from distillguard.guard.watermarks import AccountWatermarks
from distillguard.watermark import WatermarkParams


class Guard:
    """The guard's parts, built from one :class:`GuardConfig`, started and closed together.
    Callers (the pipeline, the admin API, scripts, tests) use the parts themselves: there is no
    second way in through this class."""

    def __init__(
        self,
        config: GuardConfig,
        *,
        monitor: Monitor | None = None,
        policy: PolicyConfig | None = None,
    ):
        self.config = config
        self.engine = make_engine(config.db)
        self.keys = KeyStore(self.engine)
        self.ledger = Ledger(
            self.engine, wait_s=config.ledger_wait_s, wedged_s=config.ledger_wedged_s
        )
        self.limiter = make_limiter(config.redis)
        self.metrics = Metrics(account_labels=config.metrics_account_labels)
        self.policy = policy or (
            PolicyConfig.load(config.policy_file) if config.policy_file else PolicyConfig()
        )
        self.auth = Authenticator(self.keys, config.admin_key, config.key_cache_ttl_s)
        self.policing = Verdicts(self.engine, self.policy, self.metrics, config.verdict_cache_ttl_s)
        self.claims = Claims(self.engine, config.idempotency_claim_ttl_s, config.idempotency_ttl_s)
        self.limits = Admitter(self.limiter, config.prices, self.metrics)
        self.watermarks = AccountWatermarks(
            WatermarkParams(
                scheme=config.watermark_scheme,
                gamma=config.watermark_gamma,
                delta=config.watermark_delta,
            ),
            config.watermark_secret,
            enabled=config.watermark,
        )
        self.monitor = self._monitor(monitor) if monitor is not None else None
        self.metrics.watch(self.ledger, self.monitor)
        self.recorder = Recorder(
            self.ledger,
            LedgerPrivacy(config.ledger_content, config.redact),
            self.metrics,
            self.claims,
            self.monitor,
        )
        self._renewer: asyncio.Task | None = None

    def _monitor(self, monitor: Monitor) -> MonitorWorker | SharedMonitor:
        """The detector built from ``config.detect_calibration`` (``serve --detect CAL``) takes
        the ledger's monitor lease, so that N replicas run one detector between them; a monitor
        given without a calibration (a plugin, a test's) sees this gateway's requests alone."""
        calibration = self.config.detect_calibration
        if calibration in (None, "external"):
            return MonitorWorker(monitor, self.policing)
        config = self.config

        def make():
            from distillguard.guard.online import OnlineDetection

            return OnlineDetection.from_calibration(
                calibration,
                extracting_after=config.extracting_after,
                extracting_after_s=config.extracting_after_s,
            )

        return SharedMonitor(
            monitor,
            self.policing,
            self.engine,
            calibration=calibration,
            make=make,
            state_dir=config.detect_state or default_state_dir(self.engine),
            ttl_s=config.detect_lease_ttl_s,
            poll_s=config.detect_poll_s,
        )

    async def start(self) -> None:
        await asyncio.to_thread(migrate, self.engine)
        self.ledger.start()
        self._renewer = asyncio.ensure_future(self.claims.renew())
        if self.monitor is not None:
            await asyncio.to_thread(self.monitor.start)  # the lease: database reads

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
        if self.monitor is not None:
            await asyncio.to_thread(self.monitor.stop)  # drains the monitor's queue
        await self.ledger.close()
        await self.limiter.close()
        self.engine.dispose()


__all__ = [
    "AccountBlocked",
    "Admission",
    "AuthError",
    "Guard",
    "GuardConfig",
    "IdempotencyConflict",
    "IdempotencyInProgress",
    "LimiterUnavailable",
    "Monitor",
    "PermissionDenied",
    "RequestLog",
    "bearer",
    "key_scope",
]
