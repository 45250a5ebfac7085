"""The request path of ``POST /v1/chat/completions``, written once and in order.

    stages:  ledger up -> authenticate -> read -> police -> idempotency -> admit
             -> countermeasure -> generate (the backend)
    exits:   settle -> ledger

A :class:`Call` carries one request through. Each stage is a small object with one job: it
reads and fills in the call, may refuse by raising an :class:`~distillguard.errors.APIError`,
and may answer early (an idempotent replay). Every way out — an answer, a refusal, the end of a
stream, a client that went away, a bug — runs the exits, so a request's reservation is always
settled and its ledger row always written. ``serve --no-guard`` runs the same pipeline without
the guard's stages and exits (:meth:`Pipeline.unguarded`).

This module sits above ``serve`` (the HTTP surface and the backends) and ``guard`` (keys,
limits, verdicts, ledger), which do not import each other: the pipeline joins them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from distillguard.errors import APIError, InvalidRequestError
from distillguard.guard.canary import canary_text
from distillguard.guard.requestlog import RequestLog
from distillguard.serve.app import ClientGone, unless_disconnected
from distillguard.serve.backend import Backend, Capability, Usage, capabilities_of
from distillguard.serve.canned import text_chunks, text_response
from distillguard.serve.schemas import (
    ChatCompletionRequest,
    check_content_type,
    parse_chat_request,
)

if TYPE_CHECKING:
    from distillguard.guard.admission import Admission, Admitter
    from distillguard.guard.auth import Authenticator
    from distillguard.guard.gateway import Guard
    from distillguard.guard.idempotency import Claims
    from distillguard.guard.metrics import Metrics
    from distillguard.guard.policy import Decision
    from distillguard.guard.recorder import Recorder
    from distillguard.guard.verdicts import Verdicts
    from distillguard.guard.watermarks import AccountWatermarks
    from distillguard.watermark import WatermarkKey

MAX_IDEMPOTENCY_KEY = 128


@dataclass
class Call:
    """One request on its way through: what the stages have learnt about it so far."""

    http: Request
    log: RequestLog  # what the ledger will hold
    used: Usage = field(default_factory=Usage)  # kept current by the backend while it answers
    req: ChatCompletionRequest | None = None
    decision: Decision | None = None  # the policy ladder's, from the account's verdict
    applied: list[str] = field(default_factory=list)  # policy actions applied so far
    lease: Admission | None = None  # tokens reserved against the limits, until settled
    watermark: WatermarkKey | None = None
    options: dict = field(default_factory=dict)  # further backend keywords (antidistill=λ)
    response: dict | None = None  # a whole answer ...
    chunks: AsyncIterator[dict] | None = None  # ... or the chunks of a streamed one
    recorded: bool = False  # the ledger has (or is writing) the row
    finished: bool = False  # every exit ran


class Stage(Protocol):
    async def __call__(self, call: Call) -> Response | None:
        """Do this stage's job on ``call``; a response is an early answer (the exits still run)."""


class Exit(Protocol):
    async def finish(self, call: Call) -> None:
        """The request was answered or refused: close its books."""

    def abandon(self, call: Call) -> Awaitable[None] | None:
        """The client went away: close its books without waiting (the task may be cancelled).
        Returns the work still to do, if any: awaited by a caller that may wait, else run on
        its own."""


# ---- stages, in the order they run ------------------------------------------------------------
@dataclass(frozen=True)
class LedgerUp:
    """Refuse at once while the ledger cannot take rows (a dead or wedged database): better than a
    generation whose record would hang or be lost."""

    recorder: Recorder

    async def __call__(self, call: Call) -> None:
        down = self.recorder.unavailable()
        if down is not None:
            raise down


@dataclass(frozen=True)
class Authenticate:
    """The caller's key: 401 without a valid, active one. Before the body is read."""

    auth: Authenticator

    async def __call__(self, call: Call) -> None:
        call.log.key = await self.auth.authenticate(call.http)


class ReadRequest:
    """The body, kept for the ledger whatever it holds, then parsed: 415 unless it is declared as
    JSON, 400 naming the bad field."""

    async def __call__(self, call: Call) -> None:
        try:
            raw = await call.http.body()
        except ClientDisconnect:  # gone while sending its body: nothing to answer
            raise ClientGone from None
        call.log.set_body(raw)
        check_content_type(call.http.headers.get("content-type"))
        call.req = parse_chat_request(raw)


@dataclass(frozen=True)
class Police:
    """The account's verdict applied to the request: a model outside the key's allowlist or a
    blocked account refused, logprobs capped, ... (guard/verdicts.py)."""

    verdicts: Verdicts

    async def __call__(self, call: Call) -> None:
        call.req, call.decision, call.applied = await self.verdicts.police(
            call.log.key, call.req, call.log
        )


@dataclass(frozen=True)
class Idempotency:
    """A retry with the same ``Idempotency-Key`` gets the first request's stored answer, never a
    second generation (guard/idempotency.py keeps the claims, across replicas)."""

    claims: Claims

    async def __call__(self, call: Call) -> Response | None:
        if not idempotency_key(call.http, call.req, call.log):
            return None
        replayed = await self.claims.replay(call.log)
        if replayed is None:  # the key is this request's now
            return None
        call.log.policy_action = "idempotent_replay"
        return JSONResponse(replayed, headers={"Idempotent-Replayed": "true"})


class IdempotencyKeyShape:
    """``serve --no-guard`` keeps no claims and replays nothing, but refuses a malformed
    ``Idempotency-Key`` as the guarded pipeline does: a client sees one rule either way."""

    async def __call__(self, call: Call) -> None:
        idempotency_header(call.http)


@dataclass(frozen=True)
class Admit:
    """Reserve the most tokens (and dollars) the request can use against its key's and its
    account's limits, tightened by a throttling verdict: 429 over one."""

    limits: Admitter
    backend: Backend

    async def __call__(self, call: Call) -> None:
        # budget() tokenizes the prompt, which makes prompt_tokens() cheap after it
        budget = await self.backend.budget(call.req)
        call.lease = await self.limits.admit(
            call.log.key,
            budget,
            call.decision,
            model=call.req.model,
            prompt_tokens=self.backend.prompt_tokens(call.req),
        )


@dataclass(frozen=True)
class Countermeasure:
    """What the verdict does to the answer: a canary in place of one, or the account's watermark
    (boosted under ``watermark_boost``) and antidistillation sampling, where the backend can.

    A countermeasure the backend cannot apply (not in its ``capabilities``) is dropped: the
    ledger row then has no watermark key id, its policy_action lacks the action, and
    ``distillguard_countermeasures_unavailable`` counts it."""

    watermarks: AccountWatermarks
    metrics: Metrics
    backend: Backend

    def _can(self, capability: Capability) -> bool:
        if capability in capabilities_of(self.backend):
            return True
        self.metrics.countermeasures_unavailable.labels(countermeasure=capability.value).inc()
        return False

    async def __call__(self, call: Call) -> None:
        log, decision, req = call.log, call.decision, call.req
        if decision is not None and decision.is_canary(log.request_id):
            call.applied.append("canary")
            log.policy_action = decision.label(call.applied)
            self.metrics.policy_actions.labels(action="canary").inc()
            text = canary_text(self.watermarks.canary_secret(), log.key.account, log.request_id)
            counts = self.backend.prompt_tokens(req), self.backend.count_tokens(text)
            if req.stream:
                call.chunks = text_chunks(req, text, *counts)
            else:
                call.response = text_response(req, text, *counts)
            return
        boost = decision.watermark_delta if decision is not None else None
        watermark = self.watermarks.watermark_for(log.key, boost)
        if watermark is not None and self._can(Capability.WATERMARK):
            call.watermark = watermark
        log.watermark_key_id = call.watermark.key_id if call.watermark else None
        if decision is not None and decision.antidistill > 0 and self._can(Capability.ANTIDISTILL):
            call.options["antidistill"] = decision.antidistill
            call.applied.append("antidistill")
            log.policy_action = decision.label(call.applied)
            self.metrics.policy_actions.labels(action="antidistill").inc()


@dataclass(frozen=True)
class Generate:
    """The backend's answer: a whole completion, or the chunks to stream (unless a countermeasure
    already answered)."""

    backend: Backend

    async def __call__(self, call: Call) -> None:
        if call.response is not None or call.chunks is not None:
            return
        kwargs = {"watermark": call.watermark, "usage": call.used, **call.options}
        if call.req.stream:
            call.chunks = await self.backend.stream(call.req, **kwargs)
        else:
            call.response = await unless_disconnected(
                call.http, self.backend.complete(call.req, **kwargs)
            )


# ---- exits, in the order they run -------------------------------------------------------------
@dataclass(frozen=True)
class Settle:
    """The reservation becomes the tokens actually used (a request cut short is charged what it
    consumed: a client cannot escape its quota by hanging up)."""

    limits: Admitter

    async def finish(self, call: Call) -> None:
        await self.limits.settle(call.lease, call.log.total_tokens, call.log.prompt_tokens)
        call.lease = None

    def abandon(self, call: Call) -> Awaitable[None] | None:
        lease, call.lease = call.lease, None
        if lease is None:
            return None
        return self.limits.settle(lease, call.log.total_tokens, call.log.prompt_tokens)


@dataclass(frozen=True)
class Ledger:
    """The request's ledger row, committed before its answer completes; its metrics; online
    detection (guard/recorder.py)."""

    recorder: Recorder

    async def finish(self, call: Call) -> None:
        call.recorded = True
        await self.recorder.finish(call.log)

    def abandon(self, call: Call) -> None:
        if not call.recorded:
            call.recorded = True
            self.recorder.abandon(call.log)
        return None


# ---- the pipeline -----------------------------------------------------------------------------
class Pipeline:
    """Run a request through ``stages``, then ``exits`` on every way out."""

    def __init__(self, stages: Sequence[Stage], exits: Sequence[Exit] = ()):
        self.stages, self.exits = tuple(stages), tuple(exits)

    @classmethod
    def guarded(cls, guard: Guard, backend: Backend) -> Pipeline:
        capabilities_of(backend, warn=True)  # a backend on the old supports_* flags: warn once
        return cls(
            [
                LedgerUp(guard.recorder),
                Authenticate(guard.auth),
                ReadRequest(),
                Police(guard.policing),
                Idempotency(guard.claims),
                Admit(guard.limits, backend),
                Countermeasure(guard.watermarks, guard.metrics, backend),
                Generate(backend),
            ],
            [Settle(guard.limits), Ledger(guard.recorder)],
        )

    @classmethod
    def unguarded(cls, backend: Backend) -> Pipeline:
        """``serve --no-guard``: no keys, limits, policies, ledger or metrics."""
        return cls([ReadRequest(), IdempotencyKeyShape(), Generate(backend)])

    async def __call__(self, request: Request) -> Response:
        call = Call(request, RequestLog(client_ip=request.client.host if request.client else None))
        early = None
        try:
            for stage in self.stages:
                early = await stage(call)
                if early is not None:
                    break
            if early is None and call.response is not None:
                call.log.add_response(call.response)
        except APIError as exc:
            call.log.fail(exc)
            await self.finish(call)
            raise
        except asyncio.CancelledError:  # nothing may be awaited now: the rest runs on its own
            for work in self.gone(call):
                _background(work)
            raise
        except ClientGone:  # a client hung up before its answer was ready: generation stopped
            for work in self.gone(call):
                await work
            return Response(status_code=499)
        except Exception:  # a bug (answered 500): its lease and its ledger row must not leak
            call.log.status, call.log.error_code = 500, "internal_error"
            charge_so_far(call.log, call.used)
            await self.finish(call)
            raise
        if early is not None or call.chunks is None:
            await self.finish(call)  # the ledger row is committed before the response leaves
            return early or JSONResponse(call.response)
        return StreamingResponse(
            self.sse(call),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def finish(self, call: Call) -> None:
        for exit_ in self.exits:
            await exit_.finish(call)
        call.finished = True

    def gone(self, call: Call) -> Iterator[Awaitable[None]]:
        """The client went away: charge what it consumed and close the books, exit by exit,
        yielding the work an exit left to do (a settlement): the caller awaits it before the
        next exit runs, or leaves it running when it may not wait."""
        call.log.status, call.log.error_code = 499, "client_closed"
        charge_so_far(call.log, call.used)
        for exit_ in self.exits:
            work = exit_.abandon(call)
            if work is not None:
                yield work

    async def sse(self, call: Call) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's framing, ending with ``[DONE]`` once the ledger has the
        row.

        Backends always end with a usage chunk (the ledger and the token limits need it); it is
        passed on only when the client asked with ``stream_options.include_usage``. An error
        after the headers went out becomes an error event.
        """
        req, log = call.req, call.log
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        try:
            error = None
            try:
                async for chunk in call.chunks:
                    log.add_chunk(chunk)
                    if not chunk.get("choices") and chunk.get("usage") is not None:
                        if not include_usage:
                            continue
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            except APIError as exc:
                log.fail(exc)
                error = exc
            charge_so_far(log, call.used)  # cut short by an error: charged what was sent
            try:
                await self.finish(call)
            except (
                APIError
            ) as exc:  # the ledger refused the row: no [DONE], the client must not count it
                yield f"data: {json.dumps(exc.to_dict())}\n\n"
                return
            if error is not None:
                yield f"data: {json.dumps(error.to_dict())}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not call.finished and not call.recorded:  # the client went away mid-stream
                for work in self.gone(call):
                    _background(work)


def charge_so_far(log: RequestLog, used: Usage) -> None:
    """Give a request cut short (client gone, or an error mid-stream) the tokens it consumed:
    prompt + completion so far, from the backend's running count, unless a final usage already
    arrived. The limits, ``/v1/usage`` and the ledger row then all see them."""
    if log.completion_tokens is None and (used.prompt_tokens or used.completion_tokens):
        log.set_usage(used.as_dict())


def idempotency_key(request: Request, req: ChatCompletionRequest, log: RequestLog) -> bool:
    """Read an ``Idempotency-Key`` header into ``log``; True when the request carries one.

    A client that retries after a timeout or a crash resends the key and gets the stored answer
    instead of a second generation (non-streaming requests only: a stream cannot be replayed
    faithfully, so the combination is refused rather than silently ignored).
    """
    key = idempotency_header(request)
    if key is None:
        return False
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


def idempotency_header(request: Request) -> str | None:
    """The ``Idempotency-Key`` header, None without one; 400 when it is empty or too long."""
    key = request.headers.get("idempotency-key")
    if key is not None and not 0 < len(key) <= MAX_IDEMPOTENCY_KEY:
        raise InvalidRequestError(
            f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} characters, got {len(key)}: "
            "send a shorter unique id (a UUID is 36)",
            param="Idempotency-Key",
            code="invalid_value",
        )
    return key


_tasks: set[asyncio.Task] = set()


def _background(work) -> None:
    """Run ``work`` on its own (a settlement after a cancellation), holding a reference so the
    loop does not drop the task before it ends."""
    task = asyncio.ensure_future(work)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


__all__ = ["Call", "Exit", "Pipeline", "Stage"]
