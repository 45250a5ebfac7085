"""Upstream backend: proxy to any OpenAI-compatible server (vLLM, TGI, llama.cpp, OpenAI) with httpx.

Requests are validated here first (same strict schema as the local backend), then forwarded
as the client sent them. Upstream failures map to OpenAI-shaped errors: unreachable or a 5xx
→ 502, no answer in time → 504; the upstream's own 4xx answers pass through unchanged.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httpx

from distillguard.errors import APIError, UpstreamError, UpstreamTimeout
from distillguard.serve.config import ServeConfig
from distillguard.serve.schemas import ChatCompletionRequest


def upstream_base_url(url: str) -> str:
    """``http://host:8000`` → ``http://host:8000/v1``; a URL with a path is used as given."""
    url = url.rstrip("/")
    return url + "/v1" if urlsplit(url).path in ("", "/") else url


class PassThroughError(APIError):
    """An upstream 4xx answer, relayed with its own status and body."""

    def __init__(self, status: int, body: dict):
        err = body.get("error") if isinstance(body.get("error"), dict) else {}
        super().__init__(str(err.get("message") or body), param=err.get("param"), code=err.get("code"))
        self.status_code = status
        self.type = str(err.get("type") or "invalid_request_error")


class UpstreamBackend:
    def __init__(self, config: ServeConfig):
        self.config = config
        self.base_url = upstream_base_url(config.upstream or "")
        headers = {"Authorization": f"Bearer {config.upstream_api_key}"} if config.upstream_api_key else {}
        timeout = httpx.Timeout(config.upstream_timeout_s, connect=min(10.0, config.upstream_timeout_s))
        self.client = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        await self.client.aclose()

    async def model_ids(self) -> list[str]:
        try:
            resp = await self.client.get("/models")
            resp.raise_for_status()
            return [m["id"] for m in resp.json().get("data", [])]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return [self.config.served_model_name] if self.config.served_model_name else []

    def budget(self, req: ChatCompletionRequest) -> int:
        """An upper bound of the tokens this request can use, without the upstream's tokenizer:
        every token of a byte-level or SentencePiece vocabulary covers at least one byte, and
        each message adds at most a few template tokens."""
        prompt = sum(len(m.text().encode()) + 8 for m in req.messages)
        return prompt + req.n * (req.requested_max_tokens or self.config.default_max_tokens)

    def _body(self, req: ChatCompletionRequest) -> dict:
        body = req.model_dump(mode="json", exclude_unset=True)
        if req.stream:  # usage is needed for the ledger and the limits; dropped later if not asked for
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        return body

    # The upstream engine samples; watermarking there goes through its own logits-processor hook
    # (vLLM, TGI), not through this proxy.
    supports_watermark = False

    async def complete(self, req: ChatCompletionRequest, *, watermark=None) -> dict:
        try:
            resp = await self.client.post("/chat/completions", json=self._body(req))
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"the upstream server {self.base_url} did not answer in time ({exc.__class__.__name__})",
                                  code="upstream_timeout") from None
        except httpx.HTTPError as exc:
            raise UpstreamError(f"the upstream server {self.base_url} is unreachable: {exc.__class__.__name__}: {exc}",
                                code="upstream_unavailable") from None
        self._raise_for_status(resp.status_code, resp.content)
        try:
            return resp.json()
        except ValueError:
            raise UpstreamError("the upstream server answered with invalid JSON", code="upstream_bad_response") from None

    async def stream(self, req: ChatCompletionRequest, *, watermark=None) -> AsyncIterator[dict]:
        request = self.client.build_request("POST", "/chat/completions", json=self._body(req))
        try:
            resp = await self.client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"the upstream server {self.base_url} did not answer in time ({exc.__class__.__name__})",
                                  code="upstream_timeout") from None
        except httpx.HTTPError as exc:
            raise UpstreamError(f"the upstream server {self.base_url} is unreachable: {exc.__class__.__name__}: {exc}",
                                code="upstream_unavailable") from None
        if resp.status_code >= 400:
            body = await resp.aread()
            await resp.aclose()
            self._raise_for_status(resp.status_code, body)
        return self._events(resp)

    async def _events(self, resp: httpx.Response) -> AsyncIterator[dict]:
        try:
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # SSE comments, event names, keep-alives
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    return
                try:
                    yield json.loads(data)
                except ValueError:
                    raise UpstreamError("the upstream server sent an invalid stream event",
                                        code="upstream_bad_response") from None
        except httpx.TimeoutException:
            raise UpstreamTimeout("the upstream server stopped sending in the middle of a stream",
                                  code="upstream_timeout") from None
        except httpx.HTTPError as exc:
            raise UpstreamError(f"the upstream stream broke: {exc.__class__.__name__}", code="upstream_unavailable") from None
        finally:
            await resp.aclose()

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
            raise UpstreamError(f"the upstream server failed with HTTP {status}: {err.get('message') or body}",
                                code="upstream_error")
        raise PassThroughError(status, body)
