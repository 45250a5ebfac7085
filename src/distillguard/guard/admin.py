"""Admin HTTP API (``/admin/...``, authorised by ``DISTILLGUARD_ADMIN_KEY``) and ``/v1/usage``.

An account's own key may read that account's usage and nothing else; every other admin route
needs the admin key.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from distillguard.errors import ConfigError, InvalidRequestError, NotFoundError
from distillguard.guard.gateway import AuthError, Guard, PermissionDenied
from distillguard.guard.ledger import account_usage
from distillguard.guard.limits import Limits
from distillguard.guard.policy import Level
from distillguard.serve.schemas import validation_to_api_error

PositiveInt = Annotated[int, Field(ge=1)]


class CreateKey(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    account: Annotated[str, Field(min_length=1, max_length=128)]
    name: Annotated[str, Field(max_length=128)] | None = None
    rpm: PositiveInt | None = None
    tpm: PositiveInt | None = None
    max_concurrent: PositiveInt | None = None
    daily_tokens: PositiveInt | None = None


class SetVerdict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    level: Annotated[str, Field(min_length=1, max_length=32)]
    reasons: list[Annotated[str, Field(max_length=500)]] = Field(default_factory=list, max_length=50)
    score: float | None = None


def admin_router(guard: Guard) -> APIRouter:
    router = APIRouter()

    async def require_admin(request: Request) -> None:
        if guard.is_admin(request):
            return
        if guard.config.admin_key is None:
            raise PermissionDenied("the admin API is disabled: set DISTILLGUARD_ADMIN_KEY on the server",
                                   code="admin_disabled")
        await guard.authenticate(request)  # 401 for a missing or unknown key
        raise PermissionDenied("this route needs the admin key", code="admin_only")

    async def usage_of(account: str) -> dict:
        rows = await asyncio.to_thread(account_usage, guard.engine, account)
        usage = rows[0] if rows else {"account": account, "requests": 0, "prompt_tokens": 0,
                                      "completion_tokens": 0, "total_tokens": 0, "last_seen": None}
        keys = await asyncio.to_thread(guard.keys.list, account)
        usage["keys"] = [{**k.public(), "live": await guard.limiter.usage(k.id)} for k in keys]
        return usage

    @router.post("/admin/keys", status_code=201)
    async def create_key(request: Request):
        await require_admin(request)
        try:
            body = CreateKey.model_validate_json(await request.body())
        except ValidationError as exc:
            raise validation_to_api_error(exc) from None
        limits = Limits(rpm=body.rpm, tpm=body.tpm, max_concurrent=body.max_concurrent, daily_tokens=body.daily_tokens)
        try:
            record, secret = await asyncio.to_thread(guard.keys.create, body.account, limits=limits, name=body.name)
        except ConfigError as exc:
            raise InvalidRequestError(str(exc), param="account", code="invalid_value") from None
        return JSONResponse({**record.public(), "key": secret}, status_code=201)

    @router.get("/admin/keys")
    async def list_keys(request: Request, account: str | None = None):
        await require_admin(request)
        return {"object": "list", "data": [k.public() for k in await asyncio.to_thread(guard.keys.list, account)]}

    @router.delete("/admin/keys/{key_id}")
    async def revoke_key(request: Request, key_id: str):
        await require_admin(request)
        try:
            record = await asyncio.to_thread(guard.keys.revoke, key_id)
        except ConfigError as exc:
            raise NotFoundError(str(exc), param="key_id", code="key_not_found") from None
        guard.forget_key(key_id)
        return record.public()

    @router.get("/admin/accounts")
    async def accounts(request: Request):
        await require_admin(request)
        return {"object": "list", "data": await asyncio.to_thread(account_usage, guard.engine)}

    @router.get("/admin/accounts/{account}/usage")
    async def admin_usage(request: Request, account: str):
        if not guard.is_admin(request):
            key = await guard.authenticate(request)
            if key.account != account:
                raise PermissionDenied("an account key can read only its own account's usage", code="forbidden")
        return await usage_of(account)

    @router.get("/admin/verdicts")
    async def list_verdicts(request: Request, account: str | None = None, limit: int = 1000):
        """Verdicts, newest first (an account's current level is its newest)."""
        await require_admin(request)
        if not 1 <= limit <= 100_000:
            raise InvalidRequestError(f"limit={limit} must be within 1..100000", param="limit", code="invalid_value")
        return {"object": "list", "data": await asyncio.to_thread(guard.verdicts, account, limit)}

    @router.post("/admin/accounts/{account}/verdict", status_code=201)
    async def set_verdict(request: Request, account: str):
        """Put an account at a level by hand (raise it, or clear a false positive with "ok")."""
        await require_admin(request)
        try:
            body = SetVerdict.model_validate_json(await request.body())
        except ValidationError as exc:
            raise validation_to_api_error(exc) from None
        try:
            Level.parse(body.level)
        except ConfigError as exc:
            raise InvalidRequestError(str(exc), param="level", code="invalid_value") from None
        row = await asyncio.to_thread(guard.record_verdict, account, body.level, score=body.score,
                                      reasons=body.reasons, source="admin")
        return JSONResponse(row, status_code=201)

    @router.get("/v1/usage")
    async def own_usage(request: Request):
        key = await guard.authenticate(request)
        return await usage_of(key.account)

    return router


__all__ = ["AuthError", "admin_router"]
