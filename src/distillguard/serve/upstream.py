"""Upstream backend: proxy to any OpenAI-compatible server (vLLM, TGI, llama.cpp, OpenAI) with aiohttp.

Requests are validated here first (same strict schema as the local backend), then forwarded
as the client sent them. Upstream failures map to OpenAI-shaped errors: unreachable or a 5xx
→ 502, no answer in time → 504; the upstream's own 4xx answers pass through unchanged.

The client is aiohttp, not httpx: on the gateway's hot path httpx (with httpcore and anyio
under it) took ~10x the CPU of aiohttp per proxied request (about 3 ms against 0.3 ms on a
2-core machine), which alone capped the gateway near 100 requests/s
(``bench/gateway_overhead.py``).

``--upstream-engine vllm``: the upstream is vLLM with distillguard's logits processor
(``integrations/vllm.py``, docs/vllm.md), so the watermark is back on. Each watermarked request
carries the account's derived key (never the master secret) in ``vllm_xargs``, with the
request's own temperature, top-p and penalties, which the plugin applies with our engine's math;
vLLM itself is asked for a neutral sampler on that request (temperature 1, or 0 when greedy,
top-p 1, no penalties), so the distribution sampled is our engine's. A client cannot send
``vllm_xargs`` or any other field of vLLM's: the strict request schema refuses unknown fields
(400), and the body sent upstream is rebuilt from the validated request.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aiohttp

from distillguard.errors import APIError, ConfigError, UpstreamError, UpstreamTimeout
from distillguard.serve.backend import Capability, Usage
from distillguard.serve.config import ServeConfig
from distillguard.serve.keymaterial import XARG, Sampler, encode
from distillguard.serve.schemas import ChatCompletionRequest


def upstream_base_url(url: str) -> str:
    """``http://host:8000`` → ``http://host:8000/v1``; a URL with a path is used as given."""
    url = url.rstrip("/")
    return url + "/v1" if urlsplit(url).path in ("", "/") else url


class PassThroughError(APIError):
    """An upstream 4xx answer, relayed with its own status and body."""

    def __init__(self, status: int, body: dict):
        err = body.get("error") if isinstance(body.get("error"), dict) else {}
        super().__init__(
            str(err.get("message") or body), param=err.get("param"), code=err.get("code")
        )
        self.status_code = status
        self.type = str(err.get("type") or "invalid_request_error")


class UpstreamBackend:
    def __init__(self, config: ServeConfig):
        self.config = config
        self.base_url = upstream_base_url(config.upstream or "")
        self.headers = (
            {"Authorization": f"Bearer {config.upstream_api_key}"}
            if config.upstream_api_key
            else {}
        )
        # sock_read bounds each wait for data (the answer's first byte and every later one), as a
        # read timeout does; connect covers taking a pooled connection or opening a new one.
        connect = min(10.0, config.upstream_timeout_s)
        self.timeout = aiohttp.ClientTimeout(
            total=None, connect=connect, sock_connect=connect, sock_read=config.upstream_timeout_s
        )
        self.session: aiohttp.ClientSession | None = None  # made in start(), on the serving loop
        # HTTP(S)_PROXY / NO_PROXY apply, as they did with httpx; read once here (aiohttp's
        # trust_env reads the environment and ~/.netrc again on every request).
        url = urlsplit(self.base_url)
        proxy = urllib.request.getproxies().get(url.scheme)
        self.proxy = (
            proxy if proxy and not urllib.request.proxy_bypass(url.hostname or "") else None
        )

    @classmethod
    def from_config(cls, config: ServeConfig) -> UpstreamBackend:
        if not config.upstream:
            raise ConfigError(
                "the upstream backend needs the server to proxy to: add --upstream URL"
            )
        return cls(config)

    def describe(self) -> str:
        if Capability.WATERMARK in self.capabilities:
            return f"proxying to {self.base_url} (vLLM with distillguard's watermark plugin)"
        return (
            f"proxying to {self.base_url} (answers not watermarked: the upstream samples on its "
            "own; --upstream-engine vllm with distillguard's plugin watermarks them)"
        )

    async def start(self) -> None:
        # No cap on connections (aiohttp's default is 100, httpx keeps only 20 alive): the
        # gateway's clients already bound the requests in flight, and a cap would either queue
        # them here, unseen, or open and close a connection per request beyond it.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), headers=self.headers, timeout=self.timeout
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    def _request(self, method: str, path: str, **kwargs):
        if self.session is None:
            raise RuntimeError(
                "UpstreamBackend.start() must run first (the app's lifespan does it)"
            )
        return self.session.request(
            method, f"{self.base_url}/{path}", allow_redirects=False, proxy=self.proxy, **kwargs
        )

    async def model_ids(self) -> list[str]:
        try:
            async with self._request("GET", "models") as resp:
                resp.raise_for_status()
                return [m["id"] for m in json.loads(await resp.read()).get("data", [])]
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError, AttributeError):
            return [self.config.served_model_name] if self.config.served_model_name else []

    async def budget(self, req: ChatCompletionRequest) -> int:
        """An upper bound of the tokens this request can use, without the upstream's tokenizer:
        every token of a byte-level or SentencePiece vocabulary covers at least one byte, and
        each message adds at most a few template tokens."""
        return self.prompt_tokens(req) + req.n * (
            req.requested_max_tokens or self.config.default_max_tokens
        )

    def prompt_tokens(self, req: ChatCompletionRequest) -> int:
        return sum(len(m.text().encode()) + 8 for m in req.messages)  # an upper bound, as above

    def count_tokens(self, text: str) -> int:
        return len(text.encode())  # an upper bound, as above

    def _body(self, req: ChatCompletionRequest, watermark=None) -> dict:
        body = req.model_dump(mode="json", exclude_unset=True)
        if (
            req.stream
        ):  # usage is needed for the ledger and the limits; dropped later if not asked for
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        if watermark is not None and Capability.WATERMARK in self.capabilities:
            sampler = Sampler(
                temperature=req.temperature,
                top_p=req.top_p,
                presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
            )
            body["vllm_xargs"] = {XARG: encode(watermark, sampler)}
            # the plugin samples with the request's settings; vLLM's must then be neutral
            body["temperature"] = 0.0 if req.temperature == 0 else 1.0
            body["top_p"] = 1.0
            body.pop("presence_penalty", None)
            body.pop("frequency_penalty", None)
        return body

    @property
    def capabilities(self) -> frozenset[Capability]:
        """Only a vLLM upstream with our logits processor embeds the watermark; any other
        samples on its own and the key would be ignored. Never antidistillation: its direction
        needs the teacher's final hidden state, which neither a plain upstream nor vLLM's
        logits-processor hook (it sees logits only) exposes."""
        if self.config.upstream_engine == "vllm":
            return frozenset({Capability.WATERMARK})
        return frozenset()

    async def complete(
        self,
        req: ChatCompletionRequest,
        *,
        watermark=None,
        antidistill: float = 0.0,
        usage: Usage | None = None,
    ) -> dict:
        if usage is not None:
            # A client gone before the answer is charged the prompt (an upper bound, as above)
            # and no completion: what the upstream generated before we hung up is unknown.
            usage.prompt_tokens = self.prompt_tokens(req)
        try:
            body = self._body(req, watermark)
            async with self._request("POST", "chat/completions", json=body) as resp:
                status, content = resp.status, await resp.read()
        except TimeoutError as exc:  # aiohttp's timeouts are TimeoutErrors (some also ClientErrors)
            raise self._timed_out(exc) from None
        except aiohttp.ClientError as exc:
            raise self._unreachable(exc) from None
        self._raise_for_status(status, content)
        try:
            return json.loads(content)
        except ValueError:
            raise UpstreamError(
                "the upstream server answered with invalid JSON", code="upstream_bad_response"
            ) from None

    async def stream(
        self,
        req: ChatCompletionRequest,
        *,
        watermark=None,
        antidistill: float = 0.0,
        usage: Usage | None = None,
    ) -> AsyncIterator[dict]:
        usage = usage if usage is not None else Usage()
        usage.prompt_tokens = self.prompt_tokens(
            req
        )  # an upper bound until the upstream's usage chunk
        try:
            resp = await self._request("POST", "chat/completions", json=self._body(req, watermark))
            if resp.status >= 400:
                try:
                    body = await resp.read()
                finally:
                    resp.release()
                self._raise_for_status(resp.status, body)
        except TimeoutError as exc:
            raise self._timed_out(exc) from None
        except aiohttp.ClientError as exc:
            raise self._unreachable(exc) from None
        return self._events(resp, usage)

    def _timed_out(self, exc: BaseException) -> UpstreamTimeout:
        return UpstreamTimeout(
            f"the upstream server {self.base_url} did not answer in time ({exc.__class__.__name__})",
            code="upstream_timeout",
        )

    def _unreachable(self, exc: BaseException) -> UpstreamError:
        return UpstreamError(
            f"the upstream server {self.base_url} is unreachable: {exc.__class__.__name__}: {exc}",
            code="upstream_unavailable",
        )

    async def _events(self, resp: aiohttp.ClientResponse, usage: Usage) -> AsyncIterator[dict]:
        finished = False
        try:
            async for line in _lines(resp.content):
                if not line.startswith(b"data:"):
                    continue  # SSE comments, event names, keep-alives
                data = line[len(b"data:") :].strip()
                if data == b"[DONE]":
                    finished = True
                    return
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise UpstreamError(
                        "the upstream server sent an invalid stream event",
                        code="upstream_bad_response",
                    ) from None
                _count(chunk, usage)
                yield chunk
            finished = True
        except TimeoutError:
            raise UpstreamTimeout(
                "the upstream server stopped sending in the middle of a stream",
                code="upstream_timeout",
            ) from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(
                f"the upstream stream broke: {exc.__class__.__name__}", code="upstream_unavailable"
            ) from None
        finally:
            if finished:
                resp.release()
            else:  # cut off (our client left, or an error): drop the connection so the upstream stops
                resp.close()

    def _raise_for_status(self, status: int, content: bytes) -> None:
        if status < 400:
            return
        try:
            body = json.loads(content)
        except ValueError:
            body = {"error": {"message": content[:500].decode("utf-8", "replace")}}
        if not isinstance(body, dict):
            body = {"error": {"message": str(body)[:500]}}
        if status >= 500:
            err = body.get("error") if isinstance(body.get("error"), dict) else {}
            raise UpstreamError(
                f"the upstream server failed with HTTP {status}: {err.get('message') or body}",
                code="upstream_error",
            )
        raise PassThroughError(status, body)


def _count(chunk, usage: Usage) -> None:
    """Keep ``usage`` current from one upstream chunk, for a stream cut short before the
    upstream's own usage chunk (which, when it comes, is exact and wins).

    Without the upstream's tokenizer the deltas' tokens are estimated: a chunk with logprobs
    has one entry per token (exact); otherwise each chunk with content counts as one token, as
    vLLM, TGI, llama.cpp and OpenAI send one chunk per generated token (a server that merges
    several tokens into a chunk is undercounted by the difference)."""
    if not isinstance(chunk, dict):
        return
    final = chunk.get("usage")
    if isinstance(final, dict) and isinstance(final.get("completion_tokens"), int):
        usage.completion_tokens = final["completion_tokens"]
        if isinstance(final.get("prompt_tokens"), int):
            usage.prompt_tokens = final["prompt_tokens"]
        return
    for choice in chunk.get("choices") or ():
        logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
        delta = choice.get("delta") if isinstance(choice, dict) else None
        entries = logprobs.get("content") if isinstance(logprobs, dict) else None
        if isinstance(entries, list) and entries:
            usage.completion_tokens += len(entries)
        elif isinstance(delta, dict) and delta.get("content"):
            usage.completion_tokens += 1


async def _lines(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """The lines of a byte stream, of any length, split at LF (a CR before it is dropped).

    Not ``StreamReader.readline``, which refuses lines longer than its buffer (a chunk with many
    top_logprobs can be long), nor ``str.splitlines``, which also splits at U+2028 and the other
    Unicode line breaks that JSON strings may hold unescaped.
    """
    pending = b""
    async for chunk in content.iter_any():
        pending += chunk
        if b"\n" not in chunk:
            continue
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.removesuffix(b"\r")
    if pending:
        yield pending.removesuffix(b"\r")
