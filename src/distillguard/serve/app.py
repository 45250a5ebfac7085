"""The OpenAI-compatible HTTP API (FastAPI): routes, body limit, and error conversion.

Every error leaves as ``{"error": {"message", "type", "param", "code"}}``; distillguard's
:class:`~distillguard.errors.APIError` tree is converted here, once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from distillguard.errors import APIError, InvalidRequestError, PayloadTooLarge
from distillguard.serve.backend import Backend, now
from distillguard.serve.completions import CompletionRequest, Completions
from distillguard.serve.config import ServeConfig
from distillguard.serve.schemas import ChatCompletionRequest

log = logging.getLogger(__name__)


class Service(Protocol):
    """Something the app starts with it and closes after it (the guard)."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...


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
    backend: Backend,
    config: ServeConfig,
    chat: Callable[[Request], Awaitable[Response]],
    *,
    health: Callable[[], APIError | None] = lambda: None,
    services: Sequence[Service] = (),
    visible: Callable[[Request], Awaitable[Callable[[str], bool]]] | None = None,
    score_prompts: bool = False,
) -> FastAPI:
    """The OpenAI-compatible routes over ``backend``. ``chat`` answers ``POST
    /v1/chat/completions`` (``distillguard.pipeline``); ``health`` names the problem that fails
    ``/healthz``, if any; ``services`` start before the backend and close after it; ``visible``
    authenticates a ``GET /v1/models`` and says which models its caller may see (every model when
    None: ``--no-guard``); ``score_prompts`` serves ``POST /v1/completions`` with prompt logprobs
    (``--no-guard`` only: :mod:`distillguard.serve.completions` says why). The app that
    composes these with the guard is ``distillguard.app``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with AsyncExitStack() as stack:
            for service in (*services, backend):
                await service.start()
                stack.push_async_callback(service.close)
            yield

    # The API docs describe every route, admin ones included: off unless asked for (``--docs``).
    docs = {} if config.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="distillguard", version="0.1.0", lifespan=lifespan, **docs)
    app.state.backend = backend
    app.state.config = config
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

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
        down = health()
        return {"status": "ok"} if down is None else error_response(down)

    @app.get("/v1/models")
    async def models(request: Request):
        # As OpenAI's: behind a key (401 without one), and a key restricted to some models
        # sees only those.
        allows = (lambda mid: True) if visible is None else await visible(request)
        return {
            "object": "list",
            "data": [
                {"id": mid, "object": "model", "created": now(), "owned_by": "distillguard"}
                for mid in await backend.model_ids()
                if allows(mid)
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
        return await chat(request)

    completions = Completions(backend, served=score_prompts)

    @app.post(
        "/v1/completions",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": CompletionRequest.model_json_schema(
                            ref_template="#/components/schemas/{model}"
                        )
                    }
                },
            }
        },
    )
    async def legacy_completions(request: Request):
        prepared = await completions.prepare(request)
        try:
            return await unless_disconnected(request, completions.answer(prepared))
        except ClientGone:
            return Response(status_code=499)

    return app


class ClientGone(Exception):
    """The client closed its connection before a non-streaming answer was ready."""


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
