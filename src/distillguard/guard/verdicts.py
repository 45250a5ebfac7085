"""Verdicts on accounts (by hand or by online detection) and the policy ladder applied to their
requests: the level an account is at, what that does to its next request, and the alert when
an account climbs the ladder."""

from __future__ import annotations

import asyncio
import logging
import time

from sqlalchemy import Engine, select

from distillguard.errors import APIError, NotFoundError
from distillguard.guard.keys import KeyRecord
from distillguard.guard.ledger import without_nul
from distillguard.guard.metrics import Metrics
from distillguard.guard.policy import MAX_AUTOMATIC, Decision, Level, PolicyConfig
from distillguard.guard.requestlog import RequestLog
from distillguard.guard.schema import Verdict

log = logging.getLogger(__name__)

# Bound the level cache's memory over many accounts.
MAX_CACHED_LEVELS = 100_000


class AccountBlocked(APIError):
    status_code = 403
    type = "permission_error"


class Verdicts:
    """An account's level is its newest verdict's, read through a cache trusted for
    ``cache_ttl_s`` seconds (the delay before a verdict recorded on another replica applies)."""

    def __init__(self, engine: Engine, policy: PolicyConfig, metrics: Metrics, cache_ttl_s: float):
        self.engine = engine
        self.policy = policy
        self.metrics = metrics
        self.cache_ttl_s = cache_ttl_s
        self._levels: dict[str, tuple[Level, float]] = {}

    async def decide(self, key: KeyRecord) -> Decision:
        """What the policy ladder does to this account's next request, from its latest verdict."""
        return self.policy.decide(await self.level_of(key.account))

    async def police(self, key: KeyRecord, req, log: RequestLog):
        """Apply the account's decision to a request: block it, or the changed request.

        Returns (request, decision, actions applied so far); ``log.policy_action`` is set.
        A model outside the key's allowlist is refused here, first: before an idempotent replay
        (Idempotency-Keys are per account, so a sibling key's stored answer could be replayed)
        and before anything is reserved.
        """
        if not key.allows(req.model):
            # OpenAI answers 404 for a model a key cannot see, with this message: a key learns
            # nothing about which models exist beyond its own, and SDKs raise NotFoundError.
            raise NotFoundError(
                f"The model `{req.model}` does not exist or you do not have access to it.",
                param="model",
                code="model_not_found",
            )
        decision = await self.decide(key)
        applied = [a for a in ("log", "throttle", "watermark_boost") if a in decision.actions]
        if decision.block:
            log.policy_action = decision.label(["block"])
            self.metrics.policy_actions.labels(action="block").inc()
            raise AccountBlocked(
                "this account is blocked for suspected model extraction; contact the provider",
                code="account_blocked",
            )
        if decision.logprobs_cap is not None and req.logprobs:
            cap = decision.logprobs_cap
            if cap == 0:
                req = req.model_copy(update={"logprobs": False, "top_logprobs": None})
                applied.append("limit_logprobs")
            elif (req.top_logprobs or 0) > cap:
                req = req.model_copy(update={"top_logprobs": cap})
                applied.append("limit_logprobs")
        log.policy_action = decision.label(applied)
        for action in applied:
            self.metrics.policy_actions.labels(action=action).inc()
        return req, decision, applied

    async def level_of(self, account: str) -> Level:
        cached = self._levels.get(account)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        level = await asyncio.to_thread(self.load_level, account)
        if len(self._levels) > MAX_CACHED_LEVELS:
            self._levels.clear()
        self._levels[account] = (level, time.monotonic() + self.cache_ttl_s)
        return level

    def load_level(self, account: str) -> Level:
        """The account's level in the database, uncached (blocking)."""
        with self.engine.connect() as conn:
            level = conn.execute(
                select(Verdict.level)
                .where(Verdict.account_id == account)
                .order_by(Verdict.id.desc())
                .limit(1)
            ).scalar()
        return Level(level) if level is not None else Level.OK

    def record(
        self,
        account: str,
        level: Level | str | int,
        *,
        score: float | None = None,
        reasons: list[str] | None = None,
        source: str = "admin",
        request_id: str | None = None,
        holder: str | None = None,
    ) -> dict:
        """Append a verdict (blocking: call it from a thread); alerts when the ladder says so.

        Only ``source="admin"`` may set a level above :data:`MAX_AUTOMATIC` (``blocked``): a
        detector's higher verdict is recorded as ``extracting``, with a reason saying so, and not
        at all when the account is there already (so a monitor that keeps saying "blocked" does
        not append a row per request). The returned row's ``id`` is None when nothing was
        written."""
        level = Level.parse(level)
        previous = self.load_level(account)
        if source != "admin" and level > MAX_AUTOMATIC:
            reasons = [
                f"{source} verdict {level.name.lower()!r} capped at "
                f"{MAX_AUTOMATIC.name.lower()!r}: only an admin sets higher levels",
                *(reasons or []),
            ]
            level = MAX_AUTOMATIC
            if previous >= level:
                return {"id": None, "account_id": account, "level": previous.name.lower()}
        row = {
            "ts": time.time(),
            "account_id": account,
            "level": int(level),
            "score": score,
            "reasons": without_nul(list(reasons or [])),
            "source": source,
            "request_id": request_id,
            "holder": holder,
        }
        with self.engine.begin() as conn:
            row["id"] = conn.execute(Verdict.__table__.insert().values(**row)).inserted_primary_key[
                0
            ]
        self._levels[account] = (level, time.monotonic() + self.cache_ttl_s)
        self.metrics.verdicts.labels(level=level.name.lower(), source=source).inc()
        decision = self.policy.decide(level)
        if decision.alert and level > previous:
            self._alert(
                {
                    **row,
                    "level": level.name.lower(),
                    "previous_level": previous.name.lower(),
                    "actions": list(decision.actions),
                }
            )
        return {**row, "level": level.name.lower()}

    def recent(self, account: str | None = None, limit: int = 1000) -> list[dict]:
        """Verdicts, newest first (blocking)."""
        query = select(*Verdict.__table__.columns).order_by(Verdict.id.desc()).limit(limit)
        if account is not None:
            query = query.where(Verdict.account_id == account)
        with self.engine.connect() as conn:
            return [
                {**r._asdict(), "level": Level(r.level).name.lower()} for r in conn.execute(query)
            ]

    def _alert(self, payload: dict) -> None:
        log.warning(
            "distillguard alert: account %s is now %s (score %s; %s)",
            payload["account_id"],
            payload["level"],
            payload["score"],
            "; ".join(payload["reasons"]) or "no reasons given",
        )
        url = self.policy.alert_webhook
        if not url:
            return
        import httpx

        try:  # off the request path (monitor thread or an admin call's thread)
            httpx.post(
                url, json={"type": "distillguard.verdict", **payload}, timeout=5.0
            ).raise_for_status()
        except httpx.HTTPError as exc:
            log.warning("alert webhook %s failed: %s", url, exc)
            self.metrics.alert_failures.inc()


__all__ = ["AccountBlocked", "Verdicts"]
