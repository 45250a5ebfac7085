"""The OpenAI-compatible HTTP API (FastAPI): routes, body limit, and error conversion.

Every error leaves as ``{"error": {"message", "type", "param", "code"}}``; distillguard's
:class:`~distillguard.errors.APIError` tree is converted here, once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from distillguard.errors import APIError, InvalidRequestError, PayloadTooLarge
from distillguard.serve.backend import Backend, Usage, now
from distillguard.serve.config import ServeConfig
from distillguard.serve.schemas import ChatCompletionRequest, parse_chat_request

if TYPE_CHECKING:
    from distillguard.guard.gateway import Guard, NullGuard

log = logging.getLogger(__name__)


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(
        exc.to_dict(), status_code=exc.status_code, headers=getattr(exc, "headers", None)
    )


class BodyLimitMiddleware:
    """Refuse bodies over ``max_bytes`` with 413, by header and while reading (chunked uploads)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await error_response(
                    InvalidRequestError("invalid Content-Length header", code="invalid_header")
                )(scope, receive, send)
            if int(length) > self.max_bytes:
                return await error_response(self._too_large())(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._too_large()
            return message

        await self.app(scope, limited_receive, send)

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"request body is larger than the limit of {self.max_bytes} bytes",
            code="request_too_large",
        )


def create_app(
    backend: Backend, config: ServeConfig, guard: Guard | NullGuard | None = None
) -> FastAPI:
    """The API app. ``guard`` (keys, limits, ledger, metrics) defaults to none at all."""
    from distillguard.guard.gateway import NullGuard, RequestLog

    guard = guard if guard is not None else NullGuard()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await guard.start()
        await backend.start()
        try:
            yield
        finally:
            await backend.close()
            await guard.close()

    # The API docs describe every route, admin ones included: off unless asked for (``--docs``).
    docs = {} if config.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="distillguard", version="0.1.0", lifespan=lifespan, **docs)
    app.state.backend = backend
    app.state.config = config
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    if guard.metrics is not None:
        from distillguard.guard.admin import admin_router

        app.include_router(admin_router(guard))

        @app.get("/metrics")
        async def metrics(request: Request):
            # Request counts, statuses and (with account labels) who uses the service: the
            # operator's, so behind the admin key unless --metrics-auth none.
            if guard.config.metrics_auth == "admin" and not guard.is_admin(request):
                from distillguard.guard.gateway import PermissionDenied

                if guard.config.admin_key is None:
                    raise PermissionDenied(
                        "/metrics needs the admin key and the server has none: set "
                        "DISTILLGUARD_ADMIN_KEY, or serve with --metrics-auth none",
                        code="admin_disabled",
                    )
                await guard.authenticate(request)  # 401 for a missing or unknown key
                raise PermissionDenied(
                    "/metrics needs the admin key (or serve with --metrics-auth none)",
                    code="admin_only",
                )
            return Response(guard.metrics.render(), media_type=guard.metrics.content_type)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error_response(
            InvalidRequestError(
                str(first.get("msg", "invalid request")), param=param, code="invalid_value"
            )
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        err = APIError(
            str(exc.detail), code={404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        )
        err.status_code, err.type = exc.status_code, "invalid_request_error"
        return JSONResponse(
            err.to_dict(), status_code=exc.status_code, headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # pragma: no cover - a bug if reached
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(
            APIError("internal server error", code="internal_error").to_dict(), status_code=500
        )

    @app.get("/healthz")
    async def healthz():
        down = guard.unavailable()
        return {"status": "ok"} if down is None else error_response(down)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {"id": mid, "object": "model", "created": now(), "owned_by": "distillguard"}
                for mid in await backend.model_ids()
            ],
        }

    @app.post(
        "/v1/chat/completions",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": ChatCompletionRequest.model_json_schema(
                            ref_template="#/components/schemas/{model}"
                        )
                    }
                },
            }
        },
    )
    async def chat_completions(request: Request):
        log = RequestLog(client_ip=request.client.host if request.client else None)
        lease = None
        used = Usage()  # kept current by the backend: what a request cut short is charged
        try:
            down = guard.unavailable()  # a dead or wedged ledger: refuse now rather than hang later
            if down is not None:
                raise down
            log.key = await guard.authenticate(request)
            try:
                raw = await request.body()
            except ClientDisconnect:  # gone while sending its body: nothing to answer
                log.status, log.error_code = 499, "client_closed"
                guard.abandon(log)
                return Response(status_code=499)
            log.set_body(raw)
            req = parse_chat_request(raw)
            decision = None
            if log.key is not None:  # the policy ladder: block, limit logprobs, ...
                req, decision, applied = await guard.police(log.key, req, log)
            if idempotency_key(request, req, log):
                replayed = await guard.replay(log)
                if replayed is not None:
                    log.policy_action = "idempotent_replay"
                    await guard.finish(log)
                    return JSONResponse(replayed, headers={"Idempotent-Replayed": "true"})
            budget = await backend.budget(
                req
            )  # tokenizes the prompt: prompt_tokens is cheap after it
            lease = await guard.admit(
                log.key, budget, decision, model=req.model, prompt_tokens=backend.prompt_tokens(req)
            )
            if decision is not None and decision.is_canary(log.request_id):
                applied.append("canary")
                log.policy_action = decision.label(applied)
                chunks, response = canary(req, log, guard, backend)
            else:
                boost = decision.watermark_delta if decision is not None else None
                watermark = (
                    guard.watermark_for(log.key, boost) if backend.supports_watermark else None
                )
                log.watermark_key_id = watermark.key_id if watermark else None
                extra = {}
                if (
                    decision is not None
                    and decision.antidistill > 0
                    and backend.supports_antidistill
                ):
                    extra["antidistill"] = decision.antidistill
                    applied.append("antidistill")
                    log.policy_action = decision.label(applied)
                    guard.metrics.policy_actions.labels(action="antidistill").inc()
                if req.stream:
                    chunks = await backend.stream(req, watermark=watermark, usage=used, **extra)
                else:
                    response = await unless_disconnected(
                        request, backend.complete(req, watermark=watermark, usage=used, **extra)
                    )
            if not req.stream:
                log.add_response(response)
        except APIError as exc:
            log.fail(exc)
            await guard.settle(lease, log.total_tokens, log.prompt_tokens)
            await guard.finish(log)
            raise
        except asyncio.CancelledError:
            log.status, log.error_code = 499, "client_closed"
            charge_so_far(log, used)
            if lease is not None:  # cancelled: no await here; the settlement runs on its own
                asyncio.ensure_future(guard.settle(lease, log.total_tokens, log.prompt_tokens))
            guard.abandon(log)
            raise
        except ClientGone:  # a non-streaming client hung up: its generation was stopped
            log.status, log.error_code = 499, "client_closed"
            charge_so_far(log, used)
            await guard.settle(lease, log.total_tokens, log.prompt_tokens)
            guard.abandon(log)
            return Response(status_code=499)
        except (
            Exception
        ):  # a bug (the handler answers 500): its lease and its ledger row must not leak
            log.status, log.error_code = 500, "internal_error"
            charge_so_far(log, used)
            await guard.settle(lease, log.total_tokens, log.prompt_tokens)
            await guard.finish(log)
            raise
        if not req.stream:
            await guard.settle(lease, log.total_tokens, log.prompt_tokens)
            await guard.finish(log)  # the ledger row is committed before the response leaves
            return JSONResponse(response)
        return StreamingResponse(
            sse(chunks, req, log, lease, guard, used),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return app


MAX_IDEMPOTENCY_KEY = 128


class ClientGone(Exception):
    """The client closed its connection before a non-streaming answer was ready."""


def charge_so_far(log, used: Usage) -> None:
    """Give a request cut short (client gone, or an error mid-stream) the tokens it consumed:
    prompt + completion so far, from the backend's running count, unless a final usage already
    arrived. The limits, ``/v1/usage`` and the ledger row then all see them: a client cannot
    escape its quota by hanging up."""
    if log.completion_tokens is None and (used.prompt_tokens or used.completion_tokens):
        log.set_usage(used.as_dict())


async def unless_disconnected(request: Request, work):
    """Await ``work`` (a coroutine), cancelling it if the client disconnects first.

    Starlette keeps running a handler whose client went away; for a non-streaming completion
    that means generating an answer nobody will read, holding a batch slot. With the body read,
    the next ASGI message can only be ``http.disconnect``, so one task waits for it.
    (Streams need none of this: the server stops iterating them when a send fails.)
    """
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task not in done:
        task.cancel()  # runs the backend's cleanup: the engine job is cancelled
        try:
            await task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - its answer is not wanted
            pass
        raise ClientGone
    return task.result()


def canary(req: ChatCompletionRequest, log, guard, backend):
    """(chunks, response) of a canary answer (policy ``canary``): one of them is None."""
    from distillguard.guard.canary import canary_chunks, canary_response, canary_text

    text = canary_text(guard.canary_secret(), log.key.account, log.request_id)
    guard.metrics.policy_actions.labels(action="canary").inc()
    prompt, completion = backend.prompt_tokens(req), backend.count_tokens(text)
    if req.stream:
        return canary_chunks(req, text, prompt, completion), None
    return None, canary_response(req, text, prompt, completion)


def idempotency_key(request: Request, req: ChatCompletionRequest, log) -> bool:
    """Read an ``Idempotency-Key`` header into ``log``; True when the request carries one.

    A client that retries after a timeout or a crash resends the key and gets the stored answer
    instead of a second generation (non-streaming requests only: a stream cannot be replayed
    faithfully, so the combination is refused rather than silently ignored).
    """
    key = request.headers.get("idempotency-key")
    if key is None:
        return False
    if not key or len(key) > MAX_IDEMPOTENCY_KEY:
        raise InvalidRequestError(
            f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} characters",
            param="Idempotency-Key",
            code="invalid_value",
        )
    if req.stream:
        raise InvalidRequestError(
            "Idempotency-Key is supported for non-streaming requests only",
            param="Idempotency-Key",
            code="unsupported_parameter",
        )
    log.idempotency_key = key
    log.request_hash = hashlib.sha256(
        json.dumps(req.model_dump(mode="json"), sort_keys=True).encode()
    ).hexdigest()
    return True


async def sse(chunks, req: ChatCompletionRequest, log, lease, guard, used: Usage | None = None):
    """Server-sent events in OpenAI's framing, ending with ``[DONE]`` once the ledger has the row.

    Backends always end with a usage chunk (the ledger and the token limits need it); it is
    passed on only when the client asked with ``stream_options.include_usage``. An error after
    the headers went out becomes an error event.
    """
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    finished = False
    try:
        error = None
        try:
            async for chunk in chunks:
                log.add_chunk(chunk)
                if (
                    not chunk.get("choices")
                    and chunk.get("usage") is not None
                    and not include_usage
                ):
                    continue
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except APIError as exc:
            log.fail(exc)
            error = exc
        if used is not None:  # cut short by an error: charged what was sent
            charge_so_far(log, used)
        await guard.settle(lease, log.total_tokens, log.prompt_tokens)
        lease = None
        finished = True
        try:
            await guard.finish(log)
        except (
            APIError
        ) as exc:  # the ledger refused the row: no [DONE], the client must not count it
            yield f"data: {json.dumps(exc.to_dict())}\n\n"
            return
        if error is not None:
            yield f"data: {json.dumps(error.to_dict())}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        if not finished:  # the client went away mid-stream
            log.status, log.error_code = 499, "client_closed"
            if used is not None:
                charge_so_far(log, used)
            guard.abandon(log)
            if lease is not None:
                asyncio.ensure_future(guard.settle(lease, log.total_tokens, log.prompt_tokens))
