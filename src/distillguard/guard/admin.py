"""Admin HTTP API (``/admin/...``, authorised by ``DISTILLGUARD_ADMIN_KEY``) and ``/v1/usage``.

An account's own key may read that account's usage and nothing else; every other admin route
needs the admin key.

Every input is bounded, so a bad value is a 400 naming it and never a 500: limits by
``guard/limits.py``'s ``MAX_*`` (they must fit the database's columns and Redis's exact
numbers), account names by ``keys.ACCOUNT_PATTERN`` (in bodies and in paths), scores and
dollars must be finite. What is already stored is read back defensively: a non-finite score
(written before scores were checked, or by a detector that overflowed) is listed as null.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from distillguard.errors import APIError, ConfigError, InvalidRequestError, NotFoundError
from distillguard.guard.admission import key_scope
from distillguard.guard.auth import AuthError, PermissionDenied
from distillguard.guard.gateway import Guard
from distillguard.guard.keys import MAX_MODEL_ID, MAX_MODELS, MAX_NAME, MAX_SECONDS, check_account
from distillguard.guard.ledger import account_usage
from distillguard.guard.limits import MAX_DAILY_TOKENS, MAX_DAILY_USD, MAX_RATE, Limits
from distillguard.guard.policy import Level

Rate = Annotated[int, Field(ge=1, le=MAX_RATE)]
DailyTokens = Annotated[int, Field(ge=1, le=MAX_DAILY_TOKENS)]
DailyUSD = Annotated[float, Field(gt=0, le=MAX_DAILY_USD, allow_inf_nan=False)]
Seconds = Annotated[int, Field(ge=0, le=MAX_SECONDS)]


class LimitFields(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    rpm: Rate | None = None
    tpm: Rate | None = None
    max_concurrent: Rate | None = None
    daily_tokens: DailyTokens | None = None
    daily_usd: DailyUSD | None = None

    def limits(self) -> Limits:
        return Limits(
            rpm=self.rpm,
            tpm=self.tpm,
            max_concurrent=self.max_concurrent,
            daily_tokens=self.daily_tokens,
            daily_usd=self.daily_usd,
        )


class CreateKey(LimitFields):
    account: str  # checked by keys.check_account, whose message names the pattern
    name: Annotated[str, Field(max_length=MAX_NAME)] | None = None
    expires_in_s: Annotated[int, Field(ge=1, le=MAX_SECONDS)] | None = None
    models: (
        Annotated[
            list[Annotated[str, Field(min_length=1, max_length=MAX_MODEL_ID)]],
            Field(min_length=1, max_length=MAX_MODELS),
        ]
        | None
    ) = None


class RotateKey(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    grace_s: Seconds = Field(3600, description="seconds the old key keeps working")
    expires_in_s: Annotated[int, Field(ge=1, le=MAX_SECONDS)] | None = None


class SetVerdict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    level: Annotated[str, Field(min_length=1, max_length=32)]
    reasons: list[Annotated[str, Field(max_length=500)]] = Field(
        default_factory=list, max_length=50
    )
    # JSON numbers like 1e999 parse as infinity: refused, since a stored Inf has no JSON form
    score: Annotated[float, Field(allow_inf_nan=False)] | None = None


def _account(name: str) -> str:
    try:
        return check_account(name)
    except ConfigError as exc:
        raise InvalidRequestError(str(exc), param="account", code="invalid_value") from None


def _finite(value):
    """A stored number as JSON can carry it: a non-finite float (which JSON cannot) as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def admin_router(guard: Guard, invalid_body: Callable[[ValidationError], APIError]) -> APIRouter:
    """The admin routes over ``guard``. ``invalid_body`` turns a body that fails its model into
    the 400 to answer: the HTTP surface's own converter (``serve/schemas.py``), passed in by the
    app that composes both, so the admin API words bad bodies as the OpenAI routes do without
    guard importing serve."""
    router = APIRouter()

    def _parse(model: type[BaseModel], raw: bytes):
        try:
            return model.model_validate_json(raw)
        except ValidationError as exc:
            raise invalid_body(exc) from None

    async def require_admin(request: Request) -> None:
        if guard.auth.is_admin(request):
            return
        if guard.config.admin_key is None:
            raise PermissionDenied(
                "the admin API is disabled: set DISTILLGUARD_ADMIN_KEY on the server",
                code="admin_disabled",
            )
        await guard.auth.authenticate(request)  # 401 for a missing or unknown key
        raise PermissionDenied("this route needs the admin key", code="admin_only")

    async def usage_of(account: str) -> dict:
        rows = await asyncio.to_thread(account_usage, guard.engine, account)
        usage = (
            rows[0]
            if rows
            else {
                "account": account,
                "requests": 0,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "total_tokens": 0,
                "last_seen": None,
            }
        )
        keys = await asyncio.to_thread(guard.keys.list, account)
        usage["limits"] = (await asyncio.to_thread(guard.keys.account_limits, account)).public()
        usage["live"] = await guard.limiter.usage(account)
        usage["keys"] = [
            {**k.public(), "live": await guard.limiter.usage(key_scope(k))} for k in keys
        ]
        return usage

    @router.post("/admin/keys", status_code=201)
    async def create_key(request: Request):
        await require_admin(request)
        body = _parse(CreateKey, await request.body())
        _account(body.account)
        expires_at = time.time() + body.expires_in_s if body.expires_in_s is not None else None
        try:
            record, secret = await asyncio.to_thread(
                guard.keys.create,
                body.account,
                limits=body.limits(),
                name=body.name,
                expires_at=expires_at,
                models=body.models,
            )
        except ConfigError as exc:
            raise InvalidRequestError(str(exc), param=None, code="invalid_value") from None
        return JSONResponse({**record.public(), "key": secret}, status_code=201)

    @router.get("/admin/keys")
    async def list_keys(request: Request, account: str | None = None):
        await require_admin(request)
        return {
            "object": "list",
            "data": [k.public() for k in await asyncio.to_thread(guard.keys.list, account)],
        }

    @router.delete("/admin/keys/{key_id}")
    async def revoke_key(request: Request, key_id: str):
        await require_admin(request)
        try:
            record = await asyncio.to_thread(guard.keys.revoke, key_id)
        except ConfigError as exc:
            raise NotFoundError(str(exc), param="key_id", code="key_not_found") from None
        guard.auth.forget_key(key_id)
        return record.public()

    @router.post("/admin/keys/{key_id}/rotate", status_code=201)
    async def rotate_key(request: Request, key_id: str):
        """A new key for the same account, limits and models; the old one expires after
        ``grace_s`` seconds (default 3600)."""
        await require_admin(request)
        body = _parse(RotateKey, await request.body() or b"{}")
        if await asyncio.to_thread(guard.keys.get, key_id) is None:
            raise NotFoundError(
                f"no key with id {key_id!r}; GET /admin/keys lists them",
                param="key_id",
                code="key_not_found",
            )
        expires_at = time.time() + body.expires_in_s if body.expires_in_s is not None else None
        try:
            new, secret, old = await asyncio.to_thread(
                guard.keys.rotate, key_id, grace_s=body.grace_s, expires_at=expires_at
            )
        except ConfigError as exc:
            raise InvalidRequestError(str(exc), param="key_id", code="invalid_value") from None
        guard.auth.forget_key(key_id)
        return JSONResponse(
            {**new.public(), "key": secret, "replaces": old.public()}, status_code=201
        )

    @router.get("/admin/accounts")
    async def accounts(request: Request):
        await require_admin(request)
        return {"object": "list", "data": await asyncio.to_thread(account_usage, guard.engine)}

    @router.put("/admin/accounts/{account}/limits")
    async def set_account_limits(request: Request, account: str):
        """Replace the limits over all of the account's keys together (absent: unlimited)."""
        await require_admin(request)
        _account(account)
        body = _parse(LimitFields, await request.body())
        limits = await asyncio.to_thread(guard.keys.set_account_limits, account, body.limits())
        guard.auth.forget_account(account)
        return {"account": account, **limits.public()}

    @router.get("/admin/accounts/{account}/usage")
    async def admin_usage(request: Request, account: str):
        if not guard.auth.is_admin(request):
            key = await guard.auth.authenticate(request)
            if key.account != account:
                raise PermissionDenied(
                    "an account key can read only its own account's usage", code="forbidden"
                )
        return await usage_of(_account(account))

    @router.get("/admin/verdicts")
    async def list_verdicts(request: Request, account: str | None = None, limit: int = 1000):
        """Verdicts, newest first (an account's current level is its newest)."""
        await require_admin(request)
        if not 1 <= limit <= 100_000:
            raise InvalidRequestError(
                f"limit={limit} must be within 1..100000", param="limit", code="invalid_value"
            )
        rows = await asyncio.to_thread(guard.policing.recent, account, limit)
        return {"object": "list", "data": [{k: _finite(v) for k, v in row.items()} for row in rows]}

    @router.post("/admin/accounts/{account}/verdict", status_code=201)
    async def set_verdict(request: Request, account: str):
        """Put an account at a level by hand (raise it, or clear a false positive with "ok")."""
        await require_admin(request)
        _account(account)
        body = _parse(SetVerdict, await request.body())
        try:
            Level.parse(body.level)
        except ConfigError as exc:
            raise InvalidRequestError(str(exc), param="level", code="invalid_value") from None
        row = await asyncio.to_thread(
            guard.policing.record,
            account,
            body.level,
            score=body.score,
            reasons=body.reasons,
            source="admin",
        )
        return JSONResponse(row, status_code=201)

    @router.get("/v1/usage")
    async def own_usage(request: Request):
        key = await guard.auth.authenticate(request)
        return await usage_of(key.account)

    return router


__all__ = ["AuthError", "admin_router"]
