"""``POST /v1/completions``: the legacy completions endpoint, with prompt logprobs (``echo``).

The shape vLLM and OpenAI's legacy API use: ``{"model", "prompt": str | [str], "max_tokens",
"echo", "logprobs": k}`` answers ``choices[i].text`` (the prompt when ``echo``, then the
completion) and ``choices[i].logprobs = {"tokens", "token_logprobs", "top_logprobs",
"text_offset"}``: with ``echo`` the prompt's own tokens come first, each with the model's
log-probability of it given the tokens before (None for the first, which has no context), then
the completion's. ``max_tokens: 0`` with ``echo`` scores a text without generating anything:
one forward pass over it.

That is how an investigator measures a suspect's likelihood of a text it can only reach through
an API (``distillguard.forensics.api_canaries``), and why the endpoint is served only without
the guard: logprobs of arbitrary text reveal the model's whole next-token distribution at every
position of any text the caller writes, an extraction channel the ledger does not meter (the
chat endpoint's logprobs cover only the model's own answer, which the ledger records). Behind
the guard it answers 404 and says so. ``--no-guard`` is a plain inference server, which is how
a suspect model is served.

The forward passes run on the engine's worker thread (:meth:`Engine.call`), between decoding
steps and a bounded number of tokens at a time, so they never race a generation step and a
long prompt list does not stall the running rows for more than one slice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated

import torch
from fastapi import Request
from pydantic import Field

from distillguard.errors import APIError, ContextLengthExceeded, InvalidRequestError, NotFoundError
from distillguard.models import LoadedModel
from distillguard.serve.backend import Backend, completion_id, now
from distillguard.serve.schemas import (
    MAX_STOP,
    MAX_TOP_LOGPROBS,
    _Strict,
    check_content_type,
    parse_request,
)

# Tokens per forward pass when scoring: (tokens, vocabulary) float logits are the memory (2048 x
# SmolLM2's 49k = 400 MB), and the running rows wait for at most one such pass.
SCORE_TOKENS = 2048
MAX_PROMPTS = 64  # prompts in one request (vLLM sets none; a bound keeps one request's work finite)

GUARDED = (
    "POST /v1/completions is not served behind the guard: prompt logprobs (echo) of arbitrary "
    "text reveal the model's whole next-token distribution at every position, an extraction "
    "channel the ledger does not meter. Use POST /v1/chat/completions (logprobs of the model's "
    "own answer), or serve an unguarded model with `distillguard serve --no-guard`"
)


class CompletionRequest(_Strict):
    model: Annotated[str, Field(min_length=1)]
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
    max_tokens: Annotated[int, Field(ge=0)] = 16  # OpenAI's default for this endpoint
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(ge=0, le=1)] = 1.0
    n: Annotated[int, Field(ge=1, le=1)] = 1
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    stream: bool = False
    # vLLM's extension: False for text that carries its own special tokens (a chat template)
    add_special_tokens: bool = True
    user: str | None = None

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def check(self) -> None:
        if self.stream:
            raise InvalidRequestError(
                "stream=true is not supported on /v1/completions here: send stream=false, or "
                "stream from /v1/chat/completions",
                param="stream",
                code="unsupported_parameter",
            )
        if self.max_tokens == 0 and not self.echo:
            raise InvalidRequestError(
                "max_tokens=0 without echo asks for nothing: pass echo=true to score the prompt "
                "(with logprobs=K for its tokens' logprobs), or max_tokens >= 1 to generate",
                param="max_tokens",
                code="invalid_value",
            )
        if any(not p for p in self.prompts):
            raise InvalidRequestError(
                "prompt must be non-empty text (an empty prompt has no token to condition on)",
                param="prompt",
                code="invalid_value",
            )
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if any(not s for s in stops):
            raise InvalidRequestError(
                "stop sequences must be non-empty", param="stop", code="invalid_value"
            )


def parse_completion_request(body: bytes) -> CompletionRequest:
    return parse_request(CompletionRequest, body)


@dataclass
class Tokenized:
    ids: list[int]
    text_offset: list[int]  # character offset in the prompt where each token's text starts


def tokenize(lm: LoadedModel, text: str, add_special_tokens: bool) -> Tokenized:
    """Token ids of ``text`` and where each starts in it.

    A fast tokenizer's offsets, except that a token never starts after the previous one's end:
    byte-level tokenizers trim a leading space out of a token's span (" the" at the "t"), and
    a token the tokenizer adds (a BOS) spans nothing, at 0. A slow tokenizer has no offsets:
    cumulative lengths of the tokens' text."""
    tok = lm.tokenizer
    if getattr(tok, "is_fast", False):
        enc = tok(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        ids, spans = list(enc["input_ids"]), enc["offset_mapping"]
        offsets, reached = [], 0
        for start, end in spans:
            offsets.append(min(start, reached) if offsets else start)
            reached = max(reached, end)
        return Tokenized(ids, offsets)
    ids = list(tok(text, add_special_tokens=add_special_tokens)["input_ids"])
    offsets, at = [], 0
    for i in ids:
        offsets.append(at)
        at += len(lm.token_bytes[i].decode("utf-8", errors="replace"))
    return Tokenized(ids, offsets)


def prompt_logprobs(
    lm: LoadedModel, prompts: Sequence[list[int]], k: int
) -> list[tuple[list[float], list[list[tuple[int, float]]]]]:
    """Per prompt: log p(token t | tokens < t) for t >= 1, and the ``k`` likeliest tokens at t
    as (id, logprob). One right-padded forward pass (runs on the engine's worker thread)."""
    dev = lm.device
    width = max(len(p) for p in prompts)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p)
        mask[b, : len(p)] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    logits = lm.model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
    out = []
    for b, p in enumerate(prompts):
        lp = logits[b, : len(p) - 1].float().log_softmax(-1)  # (L-1, V): position t predicts t+1
        chosen = lp.gather(-1, ids[b, 1 : len(p), None])[:, 0]  # (L-1,)
        top: list[list[tuple[int, float]]] = [[] for _ in range(len(p) - 1)]
        if k:
            vals, idx = lp.topk(min(k, lp.shape[-1]), dim=-1)  # (L-1, k)
            top = [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
        out.append((chosen.tolist(), top))
    return out


def _slices(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Prompt indices grouped in order so each group's padded size stays within ``budget``
    tokens (a longer prompt goes alone)."""
    groups: list[list[int]] = []
    for i, n in enumerate(lengths):
        group = groups[-1] if groups else None
        if group and max(n, *(lengths[j] for j in group)) * (len(group) + 1) <= budget:
            group.append(i)
        else:
            groups.append([i])
    return groups


@dataclass
class Prepared:
    """A request read, validated and tokenized, ready to answer."""

    engine: object
    lm: LoadedModel
    req: CompletionRequest
    toks: list[Tokenized]


class Completions:
    """``POST /v1/completions`` over a local backend's engine; ``served`` False (behind the guard)
    refuses every request, saying why."""

    def __init__(self, backend: Backend, *, served: bool):
        self.backend = backend
        self.served = served

    async def prepare(self, request: Request) -> Prepared:
        """The request read, validated and tokenized (4xx here, before any work)."""
        if not self.served:
            raise NotFoundError(GUARDED, code="unsupported_endpoint")
        check_content_type(request.headers.get("content-type"))
        req = parse_completion_request(await request.body())
        engine = getattr(self.backend, "engine", None)
        if engine is None or not hasattr(engine, "call"):
            raise NotFoundError(
                f"POST /v1/completions needs a local model: this server's backend "
                f"({type(self.backend).__name__}) generates elsewhere; use /v1/chat/completions, "
                "or ask the upstream server's own /v1/completions",
                code="unsupported_endpoint",
            )
        lm: LoadedModel = engine.lm
        if req.model not in await self.backend.model_ids():
            raise NotFoundError(
                f"The model {req.model!r} does not exist; this server serves "
                f"{', '.join(await self.backend.model_ids())}",
                param="model",
                code="model_not_found",
            )
        toks = await asyncio.to_thread(
            lambda: [tokenize(lm, p, req.add_special_tokens) for p in req.prompts]
        )
        limit = min(
            getattr(self.backend, "max_prompt_tokens", None) or lm.context_length, lm.context_length
        )
        for i, t in enumerate(toks):
            if not t.ids:
                raise InvalidRequestError(
                    f"prompt[{i}] has no tokens", param="prompt", code="invalid_value"
                )
            if len(t.ids) > limit or len(t.ids) + req.max_tokens > lm.context_length:
                raise ContextLengthExceeded(
                    f"prompt[{i}] is {len(t.ids)} tokens and max_tokens {req.max_tokens}; this "
                    f"server accepts prompts of at most {limit} tokens and a context of "
                    f"{lm.context_length}. Shorten the prompt or lower max_tokens.",
                    param="prompt" if len(t.ids) > limit else "max_tokens",
                )
        return Prepared(engine, lm, req, toks)

    async def answer(self, p: Prepared) -> dict:
        """The response to a prepared request (the HTTP layer cancels it if the client leaves:
        its generation and its remaining scoring slices stop)."""
        engine, lm, req, toks = p.engine, p.lm, p.req, p.toks
        scored = await self._score(engine, [t.ids for t in toks], req) if req.echo else None
        generated = (
            await asyncio.gather(*(self._generate(engine, t.ids, req) for t in toks))
            if req.max_tokens
            else [None] * len(toks)
        )
        choices = []
        for i, (prompt, t, gen) in enumerate(zip(req.prompts, toks, generated)):
            choices.append(self._choice(i, lm, req, prompt, t, scored and scored[i], gen))
        prompt_tokens = sum(len(t.ids) for t in toks)
        completion_tokens = sum(g.tokens for g in generated if g is not None)
        return {
            "id": "cmpl-" + completion_id().removeprefix("chatcmpl-"),
            "object": "text_completion",
            "created": now(),
            "model": req.model,
            "system_fingerprint": getattr(self.backend, "fingerprint", None),
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    async def _score(self, engine, prompts: list[list[int]], req: CompletionRequest):
        k = req.logprobs or 0
        out: list = [None] * len(prompts)
        # one slice per engine call, awaited in turn: decoding steps run between them
        for group in _slices([len(p) for p in prompts], SCORE_TOKENS):
            part = [prompts[i] for i in group]
            done = await asyncio.wrap_future(
                engine.call(lambda lm, part=part: prompt_logprobs(lm, part, k))
            )
            for i, r in zip(group, done):
                out[i] = r
        return out

    async def _generate(self, engine, prompt_ids: list[int], req: CompletionRequest):
        from distillguard.serve.engine import GenParams, Job

        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        params = GenParams(
            max_new_tokens=req.max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            stop=tuple(stops),
            seed=req.seed,
            top_logprobs=req.logprobs,
        )
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job = Job(
            prompt_ids=prompt_ids,
            params=params,
            n=1,
            sink=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
        )
        gen = Generated()
        engine.submit(job)
        try:
            while True:
                ev = await events.get()
                if ev.kind == "delta":
                    gen.text += ev.text
                    gen.entries.extend(ev.logprobs)
                elif ev.kind == "finish":
                    gen.finish_reason = ev.finish_reason
                elif ev.kind == "error":
                    if isinstance(ev.error, APIError):
                        raise ev.error
                    raise APIError(
                        f"generation failed: {ev.error.__class__.__name__}", code="internal_error"
                    )
                elif ev.kind == "done":
                    gen.tokens = job.completion_tokens
                    return gen
        finally:
            job.cancelled.set()  # a no-op when finished; stops generation if the client left

    @staticmethod
    def _choice(i, lm: LoadedModel, req, prompt: str, t: Tokenized, scored, gen) -> dict:
        text = (prompt if req.echo else "") + (gen.text if gen else "")
        logprobs = None
        if req.logprobs is not None:
            tokens, token_lps, tops, offsets = [], [], [], []
            if scored is not None:
                chosen, top = scored
                for j, tid in enumerate(t.ids):
                    token = lm.token_bytes[tid].decode("utf-8", errors="replace")
                    tokens.append(token)
                    offsets.append(t.text_offset[j])
                    if j == 0:  # no context to predict the first token from
                        token_lps.append(None)
                        tops.append(None)
                        continue
                    # OpenAI's: the chosen token always listed; tokens keyed by their text, so
                    # of several that decode alike (byte pieces, "\ufffd") the likeliest stays
                    alts = {token: chosen[j - 1]}
                    for a, v in top[j - 1]:
                        alts.setdefault(lm.token_bytes[a].decode("utf-8", errors="replace"), v)
                    token_lps.append(chosen[j - 1])
                    tops.append(alts)
            at = len(prompt) if req.echo else 0
            for e in gen.entries if gen else []:
                tokens.append(e["token"])
                token_lps.append(e["logprob"])
                tops.append(
                    {a["token"]: a["logprob"] for a in e.get("top_logprobs", [])}
                    | {e["token"]: e["logprob"]}
                )
                offsets.append(at)
                at += len(e["token"])
            logprobs = {
                "tokens": tokens,
                "token_logprobs": token_lps,
                "top_logprobs": tops,
                "text_offset": offsets,
            }
        return {
            "index": i,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": gen.finish_reason if gen else "length",
        }


@dataclass
class Generated:
    """One prompt's completion, as the engine's events built it."""

    text: str = ""
    entries: list[dict] = field(default_factory=list)  # the chat endpoint's logprob entries
    finish_reason: str | None = None
    tokens: int = 0


__all__ = ["Completions", "CompletionRequest", "prompt_logprobs", "tokenize"]
