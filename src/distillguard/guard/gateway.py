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
import time
import uuid
from dataclasses import dataclass, field

from fastapi import Request
from sqlalchemy import select
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from distillguard.errors import APIError
from distillguard.guard.db import make_engine, migrate
from distillguard.guard.keys import KeyRecord, KeyStore, hash_key
from distillguard.guard.ledger import Ledger
from distillguard.guard.limits import Lease, RateLimited, make_limiter
from distillguard.guard.metrics import Metrics
from distillguard.guard.schema import IdempotentResponse
from distillguard.watermark import WatermarkKey, WatermarkParams, account_key
from distillguard.watermark.secret import load_secret

log = logging.getLogger(__name__)

MAX_LOGGED_INVALID_BODY = 4096


class GuardConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DISTILLGUARD_", frozen=True, extra="ignore")

    db: str | None = Field(None, description="ledger database: a path, sqlite:///FILE or postgresql+psycopg://...")
    redis: str | None = Field(None, description="redis://... to share rate-limit counters between replicas")
    admin_key: SecretStr | None = Field(None, description="bearer key for /admin routes")
    metrics_account_labels: bool = Field(False, description="label Prometheus series by account")
    key_cache_ttl_s: float = Field(2.0, ge=0, description="how long a key lookup is trusted (revocation delay across replicas)")
    watermark: bool = Field(True, description="watermark every account's responses with its own key")
    watermark_secret: SecretStr | None = Field(None, description="master secret of the per-account keys (default: a file in the data dir)")
    watermark_scheme: str = Field("keyed-hash", description="keyed-hash | lefthash-ref")
    watermark_gamma: float = Field(0.25, description="fraction of the vocabulary that is green")
    watermark_delta: float = Field(2.0, description="logit bias added to green tokens")


def _redis_errors() -> type[BaseException]:
    try:
        from redis.exceptions import RedisError
    except ImportError:  # pragma: no cover - redis is a dependency, but only needed with --redis
        return OSError
    return RedisError


class LimiterUnavailable(APIError):
    status_code = 503
    type = "server_error"


class IdempotencyConflict(APIError):
    status_code = 409
    type = "invalid_request_error"


class AuthError(APIError):
    status_code = 401
    type = "invalid_request_error"


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
        try:
            body = json.loads(raw)
            self.body = body if isinstance(body, dict) else {"_invalid": raw[:MAX_LOGGED_INVALID_BODY].decode("utf-8", "replace")}
        except ValueError:
            self.body = {"_invalid": raw[:MAX_LOGGED_INVALID_BODY].decode("utf-8", "replace")}
        self.stream = bool(self.body.get("stream") is True)

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
            self.texts[i] = self.texts.get(i, "") + ((choice.get("delta") or {}).get("content") or "")
        self.set_usage(chunk.get("usage"))

    @property
    def total_tokens(self) -> int:
        return (self.prompt_tokens or 0) + (self.completion_tokens or 0)

    def row(self) -> dict:
        texts = [self.texts[i] for i in sorted(self.texts)]
        return {
            "request_id": self.request_id, "ts": self.ts,
            "account_id": self.key.account if self.key else None, "key_id": self.key.id if self.key else None,
            "client_ip": self.client_ip, "model": (self.body or {}).get("model") if isinstance((self.body or {}).get("model"), str) else None,
            "request_body": self.body,
            # One choice: its text. n > 1: a JSON list of the choices' texts.
            "response_text": (texts[0] if len(texts) == 1 else json.dumps(texts, ensure_ascii=False)) if texts else None,
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "latency_ms": (time.perf_counter() - self.t0) * 1000, "status": self.status,
            "error_code": self.error_code, "stream": self.stream, "policy_action": self.policy_action,
            "watermark_key_id": self.watermark_key_id,
        }


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

    async def admit(self, key: KeyRecord | None, budget: int) -> Lease | None:
        return None

    async def settle(self, lease: Lease | None, actual_tokens: int) -> None: ...

    def watermark_for(self, key: KeyRecord | None) -> WatermarkKey | None:
        return None

    async def replay(self, log: RequestLog) -> dict | None:
        return None

    async def finish(self, log: RequestLog) -> None: ...

    def abandon(self, log: RequestLog) -> None: ...


class Guard:
    def __init__(self, config: GuardConfig):
        self.config = config
        self.engine = make_engine(config.db)
        self.keys = KeyStore(self.engine)
        self.ledger = Ledger(self.engine)
        self.limiter = make_limiter(config.redis)
        self.metrics = Metrics(account_labels=config.metrics_account_labels)
        self._key_cache: dict[str, tuple[KeyRecord | None, float]] = {}
        self._watermark_params = WatermarkParams(
            scheme=config.watermark_scheme, gamma=config.watermark_gamma, delta=config.watermark_delta)
        self._watermark_secret = (load_secret(config.watermark_secret.get_secret_value() if config.watermark_secret
                                              else None) if config.watermark else None)
        self._watermark_keys: dict[str, WatermarkKey] = {}

    async def start(self) -> None:
        await asyncio.to_thread(migrate, self.engine)
        self.ledger.start()

    async def close(self) -> None:
        await self.ledger.close()
        await self.limiter.close()
        self.engine.dispose()

    # ---- authentication -----------------------------------------------------------------
    async def authenticate(self, request: Request) -> KeyRecord:
        secret = bearer(request)
        if secret is None:
            raise AuthError("You didn't provide an API key. Send it as 'Authorization: Bearer KEY' "
                            "(create one with `distillguard keys create --account NAME`).",
                            code="missing_api_key")
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
        return record

    def forget_key(self, key_id: str) -> None:
        """Drop a key from the lookup cache (after revocation through this replica)."""
        self._key_cache = {d: v for d, v in self._key_cache.items() if v[0] is None or v[0].id != key_id}

    def is_admin(self, request: Request) -> bool:
        secret = bearer(request)
        admin = self.config.admin_key.get_secret_value() if self.config.admin_key else None
        return bool(secret and admin and hmac.compare_digest(secret.encode(), admin.encode()))

    # ---- limits -------------------------------------------------------------------------
    async def admit(self, key: KeyRecord, budget: int) -> Lease:
        try:
            return await self.limiter.acquire(key.id, key.limits, budget)
        except RateLimited as exc:
            self.metrics.rate_limited.labels(limit=exc.limit).inc()
            raise
        except (OSError, _redis_errors()) as exc:
            # Fail closed: without the shared counters no limit can be enforced.
            raise LimiterUnavailable(f"the rate limiter is unavailable ({exc.__class__.__name__}); retry later",
                                     code="limiter_unavailable") from None

    async def settle(self, lease: Lease | None, actual_tokens: int) -> None:
        if lease is None:
            return
        try:
            await self.limiter.release(lease, actual_tokens)
        except (OSError, _redis_errors()):
            # The lease expires by itself (its TTL); the answer already went out.
            log.warning("could not settle lease %s; it will expire", lease.lease_id)

    # ---- watermark ------------------------------------------------------------------------
    def watermark_for(self, key: KeyRecord | None) -> WatermarkKey | None:
        """The account's own watermark key (HMAC of the account id under the master secret)."""
        if key is None or self._watermark_secret is None:
            return None
        found = self._watermark_keys.get(key.account)
        if found is None:
            found = account_key(self._watermark_secret, key.account, self._watermark_params)
            self._watermark_keys[key.account] = found
        return found

    # ---- ledger ---------------------------------------------------------------------------
    async def finish(self, log: RequestLog) -> None:
        """Commit the request's ledger row; only then may its response complete.

        Requests without a valid key are counted in the metrics but not written to the ledger:
        a flood of unauthenticated requests must not be able to fill the database.
        """
        self._observe(log)
        if log.key is None:
            return
        idempotent = None
        if log.idempotency_key is not None and log.status == 200 and log.response_body is not None:
            idempotent = {"account_id": log.key.account, "key": log.idempotency_key, "request_hash": log.request_hash,
                          "request_id": log.request_id, "response": log.response_body, "created_at": log.ts}
        await self.ledger.record(log.row(), idempotent=idempotent)

    async def replay(self, log: RequestLog) -> dict | None:
        """The stored response to this account's earlier request with the same Idempotency-Key.

        Raises 409 when the key was used with a different request body (a client bug that
        would otherwise silently return the answer to another question)."""
        def lookup():
            with self.engine.connect() as conn:
                return conn.execute(select(IdempotentResponse.request_hash, IdempotentResponse.response).where(
                    IdempotentResponse.account_id == log.key.account,
                    IdempotentResponse.key == log.idempotency_key)).first()

        found = await asyncio.to_thread(lookup)
        if found is None:
            return None
        if found.request_hash != log.request_hash:
            raise IdempotencyConflict(
                "this Idempotency-Key was already used with a different request body; use a new key",
                param="Idempotency-Key", code="idempotency_key_reused")
        return found.response

    def abandon(self, log: RequestLog) -> None:
        """Record a request whose client went away, without waiting (we may be cancelled)."""
        self._observe(log)
        if log.key is not None:
            self.ledger.submit(log.row())

    def _observe(self, log: RequestLog) -> None:
        self.metrics.observe(status=log.status, account=log.key.account if log.key else None,
                             prompt_tokens=log.prompt_tokens, completion_tokens=log.completion_tokens,
                             seconds=time.perf_counter() - log.t0)
