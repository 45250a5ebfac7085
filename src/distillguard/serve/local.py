"""Local backend: a transformers model behind the continuous-batching :class:`Engine`."""

from __future__ import annotations

import asyncio
import hashlib
import weakref
from collections.abc import AsyncIterator

from distillguard.errors import APIError, ContextLengthExceeded, InvalidRequestError, NotFoundError
from distillguard.models import LoadedModel
from distillguard.serve.backend import Capability, Usage, completion_id, now
from distillguard.serve.config import ServeConfig
from distillguard.serve.engine import Engine, Event, GenParams, Job
from distillguard.serve.schemas import ChatCompletionRequest
from distillguard.watermark import WatermarkKey

_WATERMARK = frozenset({Capability.WATERMARK})
_BOTH = frozenset({Capability.WATERMARK, Capability.ANTIDISTILL})


class LocalBackend:
    def __init__(self, lm: LoadedModel, config: ServeConfig):
        self.lm = lm
        self.config = config
        self.model_id = config.model_id
        self.fingerprint = "fp_" + hashlib.sha256(lm.spec.encode()).hexdigest()[:10]
        self.engine = Engine(
            lm,
            max_batch_rows=config.max_batch_rows,
            batch_wait_s=config.batch_wait_ms / 1000,
            prefill_chunk=config.prefill_chunk,
        )
        self.max_prompt_tokens = min(
            config.max_prompt_tokens or lm.context_length, lm.context_length
        )
        # No token covers more bytes than this (special tokens written out included), so a prompt of
        # B bytes has at least B / this many tokens: enough to refuse a huge one without tokenizing it.
        self._max_token_bytes = max(
            [len(b) for b in self.engine._token_bytes]
            + [len(t.encode()) for t in lm.tokenizer.all_special_tokens]
            + [1]
        )
        # Prompt ids of the requests in flight, by id(request): tokenized once, by budget() (in a
        # worker thread), and reused by the generation; an entry goes when its request does.
        self._prompts: dict[int, list[int]] = {}

    @classmethod
    def from_config(cls, config: ServeConfig) -> LocalBackend:
        from distillguard.models import load_model

        return cls(load_model(config.model, device=config.device), config)

    def describe(self) -> str:
        return f"serving {self.model_id!r} on {self.lm.device} (context {self.lm.context_length} tokens)"

    async def start(self) -> None:
        self.engine.start()

    async def close(self) -> None:
        await asyncio.to_thread(self.engine.stop)

    async def model_ids(self) -> list[str]:
        return [self.model_id]

    async def budget(self, req: ChatCompletionRequest) -> int:
        """Most tokens (prompt + all completions) this request can use: what limits reserve."""
        max_new = req.requested_max_tokens or self.config.default_max_tokens
        return len(await self._prompt_ids(req)) + req.n * max_new

    def prompt_tokens(self, req: ChatCompletionRequest) -> int:
        ids = self._prompts.get(id(req))
        return len(ids) if ids is not None else len(self._tokenize(req))

    async def _prompt_ids(self, req: ChatCompletionRequest) -> list[int]:
        """The prompt's token ids, tokenized once per request and off the event loop (a 4 MB
        prompt takes seconds, during which every other client would wait)."""
        ids = self._prompts.get(id(req))
        if ids is None:
            ids = await asyncio.to_thread(self._tokenize, req)
            self._prompts[id(req)] = ids
            weakref.finalize(req, self._prompts.pop, id(req), None)
        return ids

    def _tokenize(self, req: ChatCompletionRequest) -> list[int]:
        if req.model != self.model_id:  # before the tokenizer's work, which is then wasted
            raise NotFoundError(
                f"The model {req.model!r} does not exist; this server serves {self.model_id!r}",
                param="model",
                code="model_not_found",
            )
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in req.messages
        ]
        at_least = sum(len(m["content"].encode()) for m in messages) // self._max_token_bytes
        if at_least > self.max_prompt_tokens:
            raise self._too_long(f"at least {at_least}")
        try:
            ids = self.lm.chat_ids(messages)
        except (
            Exception
        ) as exc:  # jinja2 raises TemplateError subclasses for messages a template rejects
            raise InvalidRequestError(
                f"the model's chat template rejected these messages: {exc}",
                param="messages",
                code="invalid_value",
            ) from None
        if len(ids) > self.max_prompt_tokens:
            raise self._too_long(str(len(ids)))
        return ids

    def _too_long(self, tokens: str) -> ContextLengthExceeded:
        return ContextLengthExceeded(
            f"The messages are {tokens} tokens; this server accepts prompts of at most "
            f"{self.max_prompt_tokens} tokens (max_prompt_tokens; the model's context is "
            f"{self.lm.context_length}). Please shorten the messages.",
            param="messages",
        )

    def count_tokens(self, text: str) -> int:
        return len(self.lm.tokenizer.encode(text, add_special_tokens=False))

    # ---- request preparation ----------------------------------------------------------
    @property
    def capabilities(self) -> frozenset[Capability]:
        """The watermark always; antidistillation after :meth:`enable_antidistill`."""
        return _WATERMARK if self.engine.antidistill is None else _BOTH

    def enable_antidistill(self, direction) -> None:
        """Serve antidistillation sampling (policy ``antidistill``) along ``direction``."""
        self.engine.enable_antidistill(direction)

    async def _job(
        self,
        req: ChatCompletionRequest,
        watermark: WatermarkKey | None = None,
        antidistill: float = 0.0,
    ) -> tuple[Job, asyncio.Queue]:
        prompt_ids = await self._prompt_ids(req)
        ctx = self.lm.context_length
        max_new = req.requested_max_tokens
        if max_new is None:
            max_new = max(1, min(self.config.default_max_tokens, ctx - len(prompt_ids)))
        if len(prompt_ids) + max_new > ctx:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {ctx} tokens. However, you requested "
                f"{len(prompt_ids) + max_new} tokens ({len(prompt_ids)} in the messages, {max_new} in the "
                "completion). Please reduce the length of the messages or completion.",
                param="messages" if len(prompt_ids) >= ctx else "max_tokens",
            )
        bias = []
        for key, value in (req.logit_bias or {}).items():
            if int(key) >= self.lm.vocab_size:
                raise InvalidRequestError(
                    f"logit_bias token id {key} is outside the vocabulary (size {self.lm.vocab_size})",
                    param="logit_bias",
                    code="invalid_value",
                )
            bias.append((int(key), value))
        params = GenParams(
            max_new_tokens=max_new,
            temperature=req.temperature,
            top_p=req.top_p,
            stop=tuple(req.stop_list),
            seed=req.seed,
            top_logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logit_bias=tuple(bias),
            watermark=watermark,
            antidistill=antidistill if self.engine.antidistill is not None else 0.0,
        )
        events: asyncio.Queue[Event] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job = Job(
            prompt_ids=prompt_ids,
            params=params,
            n=req.n,
            sink=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
        )
        return job, events

    # ---- responses --------------------------------------------------------------------
    async def complete(
        self,
        req: ChatCompletionRequest,
        *,
        watermark: WatermarkKey | None = None,
        antidistill: float = 0.0,
        usage: Usage | None = None,
    ) -> dict:
        job, events = await self._job(req, watermark, antidistill)
        usage = usage if usage is not None else Usage()
        usage.prompt_tokens = len(job.prompt_ids)
        texts = [""] * req.n
        entries: list[list[dict]] = [[] for _ in range(req.n)]
        reasons: list[str | None] = [None] * req.n
        self.engine.submit(job)
        try:
            while True:
                ev = await events.get()
                if ev.kind == "delta":
                    texts[ev.index] += ev.text
                    entries[ev.index].extend(ev.logprobs)
                elif ev.kind == "finish":
                    reasons[ev.index] = ev.finish_reason
                elif ev.kind == "error":
                    raise _api_error(ev.error)
                elif ev.kind == "done":
                    break
        finally:
            job.cancelled.set()  # no-op when finished; stops generation if the client went away
            # Every token generated is charged, read or not: the client that left made us make them.
            usage.completion_tokens = job.completion_tokens
        return {
            "id": completion_id(),
            "object": "chat.completion",
            "created": now(),
            "model": self.model_id,
            "system_fingerprint": self.fingerprint,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": texts[i], "refusal": None},
                    "logprobs": {"content": entries[i], "refusal": None} if req.logprobs else None,
                    "finish_reason": reasons[i],
                }
                for i in range(req.n)
            ],
            "usage": ev.usage,
        }

    async def stream(
        self,
        req: ChatCompletionRequest,
        *,
        watermark: WatermarkKey | None = None,
        antidistill: float = 0.0,
        usage: Usage | None = None,
    ) -> AsyncIterator[dict]:
        job, events = await self._job(
            req, watermark, antidistill
        )  # raises before anything is streamed
        usage = usage if usage is not None else Usage()
        usage.prompt_tokens = len(job.prompt_ids)
        self.engine.submit(job)
        return self._chunks(req, job, events, usage)

    async def _chunks(
        self, req: ChatCompletionRequest, job: Job, events: asyncio.Queue, usage: Usage
    ) -> AsyncIterator[dict]:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        base = {
            "id": completion_id(),
            "object": "chat.completion.chunk",
            "created": now(),
            "model": self.model_id,
            "system_fingerprint": self.fingerprint,
        }
        if include_usage:
            base["usage"] = None

        def chunk(index: int, delta: dict, logprobs=None, finish=None) -> dict:
            lp = (
                {"content": logprobs, "refusal": None}
                if req.logprobs and logprobs is not None
                else None
            )
            return {
                **base,
                "choices": [
                    {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
                ],
            }

        try:
            for i in range(req.n):
                yield chunk(i, {"role": "assistant", "content": ""})
            while True:
                ev = await events.get()
                if ev.kind == "delta":
                    # Counted as it is handed on: what a client that hangs up now was sent.
                    usage.completion_tokens = ev.tokens
                    yield chunk(ev.index, {"content": ev.text}, ev.logprobs)
                elif ev.kind == "finish":
                    yield chunk(ev.index, {}, None, ev.finish_reason)
                elif ev.kind == "error":
                    raise _api_error(ev.error)
                elif ev.kind == "done":
                    usage.completion_tokens = ev.usage["completion_tokens"]
                    # Always sent: the HTTP layer needs usage for the ledger and the token
                    # limits, and drops this chunk unless the client asked for it.
                    yield {**base, "choices": [], "usage": ev.usage}
                    return
        finally:
            job.cancelled.set()


def _api_error(exc: BaseException) -> APIError:
    """An engine failure as an OpenAI-shaped 500 (so a stream ends with an error event, not a cut)."""
    if isinstance(exc, APIError):
        return exc
    return APIError(f"generation failed: {exc.__class__.__name__}", code="internal_error")
