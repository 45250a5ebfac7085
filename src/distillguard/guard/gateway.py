"""The guard in front of the backend: authentication, limits, the ledger and metrics.

The HTTP layer (``serve/app.py``) drives one request through these steps::

    key   = await guard.authenticate(request)      # 401 without a valid, active key
    lease = await guard.admit(key, budget)          # 429 over a limit (tokens reserved up front)
    ... backend generates ...
    await guard.settle(lease, actual_tokens)        # the reservation becomes the actual count
    await guard.finish(log)                         # ledger row committed, then the last byte goes out

:class:`NullGuard` has the same interface and does nothing: ``serve --no-guard``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Literal, Protocol

from fastapi import Request
from pydantic import Field, SecretStr
from pydantic_core import from_json
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import null, select, tuple_
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from distillguard.errors import APIError, NotFoundError
from distillguard.guard.db import make_engine, migrate
from distillguard.guard.keys import KeyRecord, KeyStore, hash_key
from distillguard.guard.ledger import Ledger, LedgerUnavailable, describe, to_traffic, without_nul
from distillguard.guard.limits import Lease, Price, RateLimited, make_limiter
from distillguard.guard.metrics import Metrics
from distillguard.guard.policy import Decision, Level, PolicyConfig
from distillguard.guard.privacy import LedgerContent, LedgerPrivacy
from distillguard.guard.schema import IdempotentResponse, Verdict
from distillguard.watermark import WatermarkKey, WatermarkParams, account_key
from distillguard.watermark.secret import load_secret

log = logging.getLogger(__name__)

MAX_LOGGED_INVALID_BODY = 4096


class GuardConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DISTILLGUARD_", frozen=True, extra="ignore")

    db: str | None = Field(
        None, description="ledger database: a path, sqlite:///FILE or postgresql+psycopg://..."
    )
    redis: str | None = Field(
        None, description="redis://... to share rate-limit counters between replicas"
    )
    admin_key: SecretStr | None = Field(None, description="bearer key for /admin routes")
    metrics_account_labels: bool = Field(False, description="label Prometheus series by account")
    key_cache_ttl_s: float = Field(
        2.0, ge=0, description="how long a key lookup is trusted (revocation delay across replicas)"
    )
    watermark: bool = Field(
        True, description="watermark every account's responses with its own key"
    )
    watermark_secret: SecretStr | None = Field(
        None, description="master secret of the per-account keys (default: a file in the data dir)"
    )
    watermark_scheme: str = Field(
        "synthid", description="synthid (SynthID-Text tournament) | keyed-hash | lefthash-ref"
    )
    watermark_gamma: float = Field(
        WatermarkParams.gamma, description="fraction of the vocabulary that is green"
    )
    watermark_delta: float = Field(
        WatermarkParams.delta, description="logit bias added to green tokens"
    )
    policy_file: str | None = Field(
        None, description="YAML/JSON policy ladder (default: guard/policy.py's DEFAULT_LADDER)"
    )
    verdict_cache_ttl_s: float = Field(
        2.0,
        ge=0,
        description="how long an account's verdict level is trusted (delay across replicas)",
    )
    metrics_auth: Literal["admin", "none"] = Field(
        "admin",
        description="admin: /metrics needs the admin key (what it counts is the operator's business; "
        "Prometheus sends it as authorization.credentials) | none: open to anyone",
    )
    ledger_content: LedgerContent = Field(
        "full",
        description="full | hashes | off: what the ledger keeps of "
        "prompts and answers (guard/privacy.py)",
    )
    redact: tuple[str, ...] = Field(
        (), description="regexes whose matches the ledger stores as [REDACTED] (full)"
    )
    idempotency_claim_ttl_s: float = Field(
        30.0,
        gt=0,
        description="an Idempotency-Key claim not renewed for this long (its replica died mid-request) "
        "is taken over by a retry; live holders renew it every third of this",
    )
    ledger_wait_s: float = Field(
        30.0,
        gt=0,
        description="longest a request waits for its ledger row to commit "
        "before it is answered 503 ledger_unavailable",
    )
    ledger_wedged_s: float = Field(
        30.0,
        gt=0,
        description="a ledger row queued this long uncommitted makes "
        "/healthz fail and new requests get 503 at once",
    )
    prices: dict[str, Price] = Field(
        default_factory=dict,
        description="model id -> {prompt, completion} USD per 1M tokens, for daily_usd "
        "budgets ('*': every other model); JSON in DISTILLGUARD_PRICES",
    )


class Monitor(Protocol):
    """Online detection, fed every finished request off the request path (a worker thread).

    ``observe`` takes a traffic-log record (DESIGN.md) and returns a verdict (anything with
    ``level`` (a :class:`Level`, its name or number), ``score`` and ``reasons``) or None."""

    def observe(self, record: dict): ...


def _redis_errors() -> type[BaseException]:
    try:
        from redis.exceptions import RedisError
    except ImportError:  # pragma: no cover - redis is a dependency, but only needed with --redis
        return OSError
    return RedisError


@dataclass(frozen=True)
class Admission:
    """A request's reservation (the limiter's lease over its key and account) and the price it
    was reserved at, so that settling prices the tokens actually used the same way."""

    lease: Lease
    price: Price | None = None


def key_scope(key: KeyRecord) -> str:
    """The limiter's scope of one key: within its account's (see guard/limits.py)."""
    return f"{key.account}/{key.id}"


class LimiterUnavailable(APIError):
    status_code = 503
    type = "server_error"


class IdempotencyConflict(APIError):
    status_code = 409
    type = "invalid_request_error"


class IdempotencyInProgress(IdempotencyConflict):
    def __init__(self, retry_after: int = 2):
        super().__init__(
            "a request with this Idempotency-Key is still being answered; retry after Retry-After "
            "seconds to get its answer (no second generation is run)",
            param="Idempotency-Key",
            code="idempotency_in_progress",
        )
        self.headers = {"Retry-After": str(retry_after)}


class AuthError(APIError):
    status_code = 401
    type = "invalid_request_error"


class AccountBlocked(APIError):
    status_code = 403
    type = "permission_error"


class PermissionDenied(APIError):
    status_code = 403
    type = "permission_error"


@dataclass
class RequestLog:
    """What the ledger will hold about one request, filled in as the request goes."""

    client_ip: str | None
    request_id: str = field(default_factory=lambda: f"req-{uuid.uuid4().hex}")
    ts: float = field(default_factory=time.time)
    t0: float = field(default_factory=time.perf_counter)
    key: KeyRecord | None = None
    body: dict | None = None
    status: int = 200
    error_code: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    texts: dict[int, str] = field(default_factory=dict)
    stream: bool = False
    policy_action: str | None = None
    watermark_key_id: str | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None
    response_body: dict | None = None  # kept only for idempotent requests

    def set_body(self, raw: bytes) -> None:
        """Keep the body for the ledger. Never raises: a body that is not an object the database
        can store (not JSON, nested past the parser's limit of 200, lone surrogates, numbers with
        thousands of digits or past a double's range) is kept as text under ``_invalid``."""
        try:
            # pydantic-core's parser, as the schema's: bounded depth (json.loads recursed until a
            # RecursionError, a 500), and strict Unicode (json.loads accepts lone surrogates, which
            # no database stores: they killed the ledger writer).
            body = from_json(raw, allow_inf_nan=False)
            if not isinstance(body, dict):
                raise ValueError("not a JSON object")
            json.dumps(body, allow_nan=False)  # 1e999 parses as inf, which jsonb refuses
        except Exception:  # noqa: BLE001 - whatever the body, the request is still recorded
            body = {"_invalid": raw[:MAX_LOGGED_INVALID_BODY].decode("utf-8", "replace")}
        self.body = body
        self.stream = bool(body.get("stream") is True)

    def fail(self, exc: APIError) -> None:
        self.status, self.error_code = exc.status_code, exc.code

    def set_usage(self, usage: dict | None) -> None:
        if usage:
            self.prompt_tokens = usage.get("prompt_tokens")
            self.completion_tokens = usage.get("completion_tokens")

    def add_response(self, response: dict) -> None:
        if self.idempotency_key is not None:
            self.response_body = response
        for choice in response.get("choices", []):
            self.texts[choice.get("index", 0)] = (choice.get("message") or {}).get("content") or ""
        self.set_usage(response.get("usage"))

    def add_chunk(self, chunk: dict) -> None:
        for choice in chunk.get("choices") or []:
            i = choice.get("index", 0)
            self.texts[i] = self.texts.get(i, "") + (
                (choice.get("delta") or {}).get("content") or ""
            )
        self.set_usage(chunk.get("usage"))

    @property
    def total_tokens(self) -> int:
        return (self.prompt_tokens or 0) + (self.completion_tokens or 0)

    def row(self) -> dict:
        texts = [self.texts[i] for i in sorted(self.texts)]
        return {
            "request_id": self.request_id,
            "ts": self.ts,
            "account_id": self.key.account if self.key else None,
            "key_id": self.key.id if self.key else None,
            # clipped to their columns (PostgreSQL refuses longer strings); the body keeps the whole
            "client_ip": _clip(self.client_ip, 64),
            "model": _clip((self.body or {}).get("model"), 256),
            "request_body": self.body,
            # One choice: its text. n > 1: a JSON list of the choices' texts.
            "response_text": (
                texts[0] if len(texts) == 1 else json.dumps(texts, ensure_ascii=False)
            )
            if texts
            else None,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "latency_ms": (time.perf_counter() - self.t0) * 1000,
            "status": self.status,
            "error_code": self.error_code,
            "stream": self.stream,
            "policy_action": self.policy_action,
            "watermark_key_id": self.watermark_key_id,
        }


def _clip(value, n: int) -> str | None:
    return value[:n] if isinstance(value, str) else None


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class NullGuard:
    """No authentication, limits, ledger or metrics (``distillguard serve --no-guard``)."""

    metrics = None

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def authenticate(self, request: Request) -> KeyRecord | None:
        return None

    async def admit(
        self,
        key: KeyRecord | None,
        budget: int,
        decision: Decision | None = None,
        *,
        model: str | None = None,
        prompt_tokens: int | None = None,
    ) -> Admission | None:
        return None

    async def settle(
        self, lease: Admission | None, actual_tokens: int, prompt_tokens: int | None = None
    ) -> None: ...

    def watermark_for(
        self, key: KeyRecord | None, delta: float | None = None
    ) -> WatermarkKey | None:
        return None

    async def decide(self, key: KeyRecord | None) -> Decision | None:
        return None

    def canary_secret(self) -> bytes | None:
        return None

    def unavailable(self) -> APIError | None:
        return None

    async def replay(self, log: RequestLog) -> dict | None:
        return None

    async def finish(self, log: RequestLog) -> None: ...

    def abandon(self, log: RequestLog) -> None: ...


class Guard:
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
        self.privacy = LedgerPrivacy(config.ledger_content, config.redact)
        self.limiter = make_limiter(config.redis)
        self.metrics = Metrics(account_labels=config.metrics_account_labels)
        self._key_cache: dict[str, tuple[KeyRecord | None, float]] = {}
        self._watermark_params = WatermarkParams(
            scheme=config.watermark_scheme,
            gamma=config.watermark_gamma,
            delta=config.watermark_delta,
        )
        self._watermark_secret = (
            load_secret(
                config.watermark_secret.get_secret_value() if config.watermark_secret else None
            )
            if config.watermark
            else None
        )
        self._watermark_keys: dict[tuple[str, float | None], WatermarkKey] = {}
        self._canary_secret: bytes | None = None
        self.policy = policy or (
            PolicyConfig.load(config.policy_file) if config.policy_file else PolicyConfig()
        )
        self._levels: dict[str, tuple[Level, float]] = {}
        self.monitor = monitor
        self._monitor_queue: queue.SimpleQueue[dict | None] = queue.SimpleQueue()
        self._monitor_thread: threading.Thread | None = None
        self.monitor_errors = 0
        self._claims: dict[
            str, tuple[str, str]
        ] = {}  # request id -> (account, Idempotency-Key) it holds
        self._renewer: asyncio.Task | None = None

    async def start(self) -> None:
        await asyncio.to_thread(migrate, self.engine)
        self.ledger.start()
        self._renewer = asyncio.ensure_future(self._renew_claims())
        if self.monitor is not None:
            self._monitor_thread = threading.Thread(
                target=self._monitor_loop, name="distillguard-monitor", daemon=True
            )
            self._monitor_thread.start()

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
        if self._monitor_thread is not None:
            self._monitor_queue.put(None)
            await asyncio.to_thread(self._monitor_thread.join, 30)
        await self.ledger.close()
        await self.limiter.close()
        self.engine.dispose()

    # ---- authentication -----------------------------------------------------------------
    async def authenticate(self, request: Request) -> KeyRecord:
        secret = bearer(request)
        if secret is None:
            raise AuthError(
                "You didn't provide an API key. Send it as 'Authorization: Bearer KEY' "
                "(create one with `distillguard keys create --account NAME`).",
                code="missing_api_key",
            )
        digest = hash_key(secret)
        cached = self._key_cache.get(digest)
        if cached is not None and cached[1] > time.monotonic():
            record = cached[0]
        else:
            record = await asyncio.to_thread(self.keys.lookup, secret)
            if len(self._key_cache) > 100_000:  # bound memory under a flood of random keys
                self._key_cache.clear()
            self._key_cache[digest] = (record, time.monotonic() + self.config.key_cache_ttl_s)
        if record is None:
            raise AuthError("Incorrect or revoked API key provided.", code="invalid_api_key")
        if record.expired():  # checked on every request: a cached record expires on time too
            at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record.expires_at))
            raise AuthError(
                f"API key {record.id} ({record.prefix}...) expired at {at}. Use the key that "
                "replaced it, or ask the provider for a new one.",
                code="expired_api_key",
            )
        return record

    def forget_key(self, key_id: str) -> None:
        """Drop a key from the lookup cache (after revocation through this replica)."""
        self._key_cache = {
            d: v for d, v in self._key_cache.items() if v[0] is None or v[0].id != key_id
        }

    def forget_account(self, account: str) -> None:
        """Drop an account's keys from the lookup cache (after its limits changed here)."""
        self._key_cache = {
            d: v for d, v in self._key_cache.items() if v[0] is None or v[0].account != account
        }

    def is_admin(self, request: Request) -> bool:
        secret = bearer(request)
        admin = self.config.admin_key.get_secret_value() if self.config.admin_key else None
        return bool(secret and admin and hmac.compare_digest(secret.encode(), admin.encode()))

    # ---- limits -------------------------------------------------------------------------
    async def admit(
        self,
        key: KeyRecord,
        budget: int,
        decision: Decision | None = None,
        *,
        model: str | None = None,
        prompt_tokens: int | None = None,
    ) -> Admission:
        """Reserve ``budget`` tokens (prompt + max completion), and their price, against the
        key's limits and its account's at once: an account's keys share its limits, so ten keys
        get the account's budget, not ten times it. A throttling verdict tightens both."""
        key_limits, account_limits = key.limits, key.account_limits
        if decision is not None:
            key_limits, account_limits = (
                decision.limits(key_limits),
                decision.limits(account_limits),
            )
        price = self.price_of(model)
        if price is None and (
            key_limits.daily_usd is not None or account_limits.daily_usd is not None
        ):
            # Fail closed: a budget in dollars cannot hold over a model without a price.
            raise PermissionDenied(
                f"model {model!r} has no price on this server and account {key.account!r} has a daily USD "
                "budget, so it cannot be served; the operator must add the model (or '*') to "
                "DISTILLGUARD_PRICES",
                param="model",
                code="model_not_priced",
            )
        usd = 0.0
        if price is not None:
            prompt = budget if prompt_tokens is None else min(prompt_tokens, budget)
            # Without the split, every token is priced at the dearer rate (an upper bound).
            usd = (
                price.usd(prompt, budget - prompt)
                if prompt_tokens is not None
                else budget * max(price.prompt, price.completion) / 1_000_000
            )
        scopes = {key_scope(key): key_limits, key.account: account_limits}
        try:
            return Admission(await self.limiter.acquire(scopes, budget, usd=usd), price)
        except RateLimited as exc:
            self.metrics.rate_limited.labels(limit=exc.limit).inc()
            raise
        except (OSError, _redis_errors()) as exc:
            # Fail closed: without the shared counters no limit can be enforced.
            raise LimiterUnavailable(
                f"the rate limiter is unavailable ({exc.__class__.__name__}); retry later",
                code="limiter_unavailable",
            ) from None

    def price_of(self, model: str | None) -> Price | None:
        prices = self.config.prices
        return prices.get(model) if model in prices else prices.get("*")

    async def settle(
        self, lease: Admission | None, actual_tokens: int, prompt_tokens: int | None = None
    ) -> None:
        """Settle the reservation to the tokens used (``prompt_tokens`` of them the prompt's,
        which prices them; without it the reserved dollars stay charged: never less than spent)."""
        if lease is None:
            return
        usd = None
        if lease.price is not None and prompt_tokens is not None:
            prompt = min(prompt_tokens, actual_tokens)
            usd = lease.price.usd(prompt, actual_tokens - prompt)
        elif lease.price is None or actual_tokens == 0:
            usd = 0.0
        try:
            await self.limiter.release(lease.lease, actual_tokens, usd)
        except (OSError, _redis_errors()):
            # The lease expires by itself (its TTL); the answer already went out.
            log.warning("could not settle lease %s; it will expire", lease.lease.lease_id)

    # ---- watermark ------------------------------------------------------------------------
    def watermark_for(
        self, key: KeyRecord | None, delta: float | None = None
    ) -> WatermarkKey | None:
        """The account's own watermark key (HMAC of the account id under the master secret);
        ``delta`` overrides the bias (policy ``watermark_boost``: same key, same green lists)."""
        if key is None or self._watermark_secret is None:
            return None
        found = self._watermark_keys.get((key.account, delta))
        if found is None:
            params = (
                self._watermark_params
                if delta is None
                else replace(self._watermark_params, delta=delta)
            )
            found = account_key(self._watermark_secret, key.account, params)
            self._watermark_keys[(key.account, delta)] = found
        return found

    def canary_secret(self) -> bytes:
        """The master secret (canaries are keyed by it too); loaded on first use when watermarking
        is off (``_watermark_secret`` stays None then: it says whether to watermark)."""
        if self._canary_secret is None:
            self._canary_secret = self._watermark_secret or load_secret(
                self.config.watermark_secret.get_secret_value()
                if self.config.watermark_secret
                else None
            )
        return self._canary_secret

    # ---- verdicts and policies ------------------------------------------------------------
    async def decide(self, key: KeyRecord) -> Decision:
        """What the policy ladder does to this account's next request, from its latest verdict."""
        return self.policy.decide(await self.level_of(key.account))

    async def level_of(self, account: str) -> Level:
        cached = self._levels.get(account)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        level = await asyncio.to_thread(self._load_level, account)
        if len(self._levels) > 100_000:
            self._levels.clear()
        self._levels[account] = (level, time.monotonic() + self.config.verdict_cache_ttl_s)
        return level

    def _load_level(self, account: str) -> Level:
        with self.engine.connect() as conn:
            level = conn.execute(
                select(Verdict.level)
                .where(Verdict.account_id == account)
                .order_by(Verdict.id.desc())
                .limit(1)
            ).scalar()
        return Level(level) if level is not None else Level.OK

    def record_verdict(
        self,
        account: str,
        level: Level | str | int,
        *,
        score: float | None = None,
        reasons: list[str] | None = None,
        source: str = "admin",
        request_id: str | None = None,
    ) -> dict:
        """Append a verdict (blocking: call it from a thread); alerts when the ladder says so."""
        level = Level.parse(level)
        previous = self._load_level(account)
        row = {
            "ts": time.time(),
            "account_id": account,
            "level": int(level),
            "score": score,
            "reasons": without_nul(list(reasons or [])),
            "source": source,
            "request_id": request_id,
        }
        with self.engine.begin() as conn:
            row["id"] = conn.execute(Verdict.__table__.insert().values(**row)).inserted_primary_key[
                0
            ]
        self._levels[account] = (level, time.monotonic() + self.config.verdict_cache_ttl_s)
        if self.metrics is not None:
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

    def verdicts(self, account: str | None = None, limit: int = 1000) -> list[dict]:
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
            if self.metrics is not None:
                self.metrics.alert_failures.inc()

    def _monitor_loop(self) -> None:
        """Feed finished requests to the monitor, in batches of whatever is queued (a monitor
        with ``observe_batch`` embeds a batch of prompts at once); record a verdict when it
        escalates an account."""
        stop = False
        while not stop:
            rows = [self._monitor_queue.get()]
            while len(rows) < 256:
                try:
                    rows.append(self._monitor_queue.get_nowait())
                except queue.Empty:
                    break
            if None in rows:
                stop, rows = True, [r for r in rows if r is not None]
            if not rows:
                continue
            try:
                records = [to_traffic(SimpleNamespace(**{"label": None, **row})) for row in rows]
                if hasattr(self.monitor, "observe_batch"):
                    verdicts = self.monitor.observe_batch(records)
                else:
                    verdicts = [self.monitor.observe(r) for r in records]
                for row, verdict in zip(rows, verdicts):
                    if verdict is None:
                        continue
                    level = Level.parse(verdict.level)
                    if level > self._load_level(
                        row["account_id"]
                    ):  # online detection only escalates
                        self.record_verdict(
                            row["account_id"],
                            level,
                            score=getattr(verdict, "score", None),
                            reasons=list(getattr(verdict, "reasons", []) or []),
                            source="online",
                            request_id=row["request_id"],
                        )
            except Exception:  # a detector bug must not stop the monitor (or the gateway)
                self.monitor_errors += 1
                log.exception(
                    "monitor failed on %d requests from %s", len(rows), rows[0].get("request_id")
                )

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

    # ---- ledger ---------------------------------------------------------------------------
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
        await self.ledger.record(self._ledger_row(log, row), idempotent=self._settle_claim(log))
        if self.monitor is not None and log.status == 200:
            self._monitor_queue.put(row)

    async def replay(self, log: RequestLog) -> dict | None:
        """Claim this account's Idempotency-Key for this request, or answer from the request that
        claimed it first.

        Returns that request's stored response (a replay), or None: the key is now this
        request's, and ``finish``/``abandon`` store its response under it or release it.
        Raises 409 ``idempotency_key_reused`` when the key came with another request body (a
        client bug that would otherwise return the answer to another question), 409
        ``idempotency_in_progress`` while the first request still runs: a retry must never start
        a second generation.

        The claim is a row in the database, not a set in memory, so it holds across replicas:
        the insert of the pending row (``response`` NULL) is atomic under the table's primary key
        (account, key), whichever replica gets there first. Its holder renews it while it runs
        (``_renew_claims``); one left unrenewed for ``idempotency_claim_ttl_s`` belonged to a
        replica that died mid-request and is taken over, so a crash blocks a key for seconds,
        not forever.
        """
        found = await asyncio.to_thread(self._claim, log)
        if found is None:
            self._claims[log.request_id] = (log.key.account, log.idempotency_key)
        return found

    def _claim(self, log: RequestLog) -> dict | None:
        t = IdempotentResponse.__table__
        here = (t.c.account_id == log.key.account) & (t.c.key == log.idempotency_key)
        dialect_insert = {"sqlite": sqlite_insert, "postgresql": postgresql_insert}[
            self.engine.dialect.name
        ]
        for _ in range(3):  # the row may go between our insert and our read (its claim released)
            now = time.time()
            with self.engine.begin() as conn:
                claimed = conn.execute(
                    dialect_insert(t)
                    .values(
                        account_id=log.key.account,
                        key=log.idempotency_key,
                        request_hash=log.request_hash,
                        request_id=log.request_id,
                        response=null(),
                        created_at=now,
                    )
                    .on_conflict_do_nothing()
                    .returning(t.c.request_id)
                )
                if claimed.first() is not None:  # (rowcount is -1 here on psycopg)
                    return None
                found = conn.execute(
                    select(t.c.request_hash, t.c.request_id, t.c.response, t.c.created_at).where(
                        here
                    )
                ).first()
                if found is None:
                    continue
                if found.request_hash != log.request_hash:
                    raise IdempotencyConflict(
                        "this Idempotency-Key was already used with a different request body; use a new key",
                        param="Idempotency-Key",
                        code="idempotency_key_reused",
                    )
                if found.response is not None:
                    return _unstored(found.response)
                if now - found.created_at <= self.config.idempotency_claim_ttl_s:
                    raise IdempotencyInProgress()
                taken = conn.execute(
                    t.update()
                    .where(here & (t.c.request_id == found.request_id) & t.c.response.is_(None))
                    .values(request_id=log.request_id, created_at=now)
                )
                if taken.rowcount == 1:
                    logging.getLogger(__name__).warning(
                        "took over the stale Idempotency-Key claim of request %s (not renewed for %.0f s)",
                        found.request_id,
                        now - found.created_at,
                    )
                    return None
        raise IdempotencyInProgress()

    def _settle_claim(self, log: RequestLog) -> dict | None:
        """What the ledger does with this request's Idempotency-Key in the row's transaction:
        store a 200's response under it, release a claim this request holds otherwise."""
        if log.idempotency_key is None or log.key is None:
            return None
        held = self._claims.pop(log.request_id, None) is not None
        claim = {
            "account_id": log.key.account,
            "key": log.idempotency_key,
            "request_id": log.request_id,
        }
        if log.status == 200 and log.response_body is not None:
            return {
                **claim,
                "request_hash": log.request_hash,
                "response": _stored(log.response_body),
                "created_at": log.ts,
            }
        return {**claim, "response": None} if held else None

    async def _renew_claims(self) -> None:
        """Keep this replica's claims fresh, so no other replica takes over a request still running."""
        while True:
            await asyncio.sleep(self.config.idempotency_claim_ttl_s / 3)
            held = dict(self._claims)
            if not held:
                continue
            try:
                await asyncio.to_thread(self._touch_claims, held)
            except Exception as exc:  # noqa: BLE001 - a database hiccup: the next round renews them
                log.warning(
                    "could not renew %d Idempotency-Key claim(s): %s", len(held), describe(exc)
                )

    def _touch_claims(self, held: dict[str, tuple[str, str]]) -> None:
        t = IdempotentResponse.__table__
        with self.engine.begin() as conn:
            conn.execute(
                t.update()
                .where(
                    tuple_(t.c.account_id, t.c.key).in_(list(held.values()))
                    & t.c.request_id.in_(list(held))
                    & t.c.response.is_(None)
                )
                .values(created_at=time.time())
            )

    def abandon(self, log: RequestLog) -> None:
        """Record a request whose client went away, without waiting (we may be cancelled).

        One that got tokens goes to online detection too: a harvester that always hangs up a
        token early must not be invisible to it."""
        self._observe(log)
        if log.key is not None:
            row = log.row()
            self.ledger.submit(self._ledger_row(log, row), idempotent=self._settle_claim(log))
            if self.monitor is not None and log.completion_tokens:
                self._monitor_queue.put(row)

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


# A replayed response must be the one the client was sent, character for character. The ledger
# stores NUL as U+FFFD (PostgreSQL refuses NUL in text and jsonb; see ``without_nul``), so the
# response kept under an Idempotency-Key is stored as its JSON text, in which json.dumps writes
# each NUL as the six ASCII characters ``\\u0000``: nothing for the database to refuse, and lossless.
_SENT = "sent_json"


def _stored(body: dict) -> dict:
    return {_SENT: json.dumps(body, ensure_ascii=False)}


def _unstored(stored: dict) -> dict:
    if set(stored) == {_SENT} and isinstance(stored[_SENT], str):
        return json.loads(stored[_SENT])
    return stored  # a row written before responses were stored as text
