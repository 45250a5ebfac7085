"""What the ledger will hold about one request, filled in as the request goes through the
pipeline (``distillguard.pipeline``) and written by the guard's recorder (``guard/gateway.py``)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from pydantic_core import from_json

from distillguard.errors import APIError
from distillguard.guard.keys import KeyRecord

MAX_LOGGED_INVALID_BODY = 4096


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
        """Keep the body for the ledger. Never raises: a body that is not an object the database
        can store (not JSON, nested past the parser's limit of 200, lone surrogates, numbers with
        thousands of digits or past a double's range) is kept as text under ``_invalid``."""
        try:
            # pydantic-core's parser, as the schema's: bounded depth (json.loads recursed until a
            # RecursionError, a 500), and strict Unicode (json.loads accepts lone surrogates, which
            # no database stores: they killed the ledger writer).
            body = from_json(raw, allow_inf_nan=False)
            if not isinstance(body, dict):
                raise ValueError("not a JSON object")
            json.dumps(body, allow_nan=False)  # 1e999 parses as inf, which jsonb refuses
        except Exception:  # noqa: BLE001 - whatever the body, the request is still recorded
            body = {"_invalid": raw[:MAX_LOGGED_INVALID_BODY].decode("utf-8", "replace")}
        self.body = body
        self.stream = bool(body.get("stream") is True)

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
            self.texts[i] = self.texts.get(i, "") + (
                (choice.get("delta") or {}).get("content") or ""
            )
        self.set_usage(chunk.get("usage"))

    @property
    def total_tokens(self) -> int:
        return (self.prompt_tokens or 0) + (self.completion_tokens or 0)

    def row(self) -> dict:
        texts = [self.texts[i] for i in sorted(self.texts)]
        return {
            "request_id": self.request_id,
            "ts": self.ts,
            "account_id": self.key.account if self.key else None,
            "key_id": self.key.id if self.key else None,
            # clipped to their columns (PostgreSQL refuses longer strings); the body keeps the whole
            "client_ip": _clip(self.client_ip, 64),
            "model": _clip((self.body or {}).get("model"), 256),
            "request_body": self.body,
            # One choice: its text. n > 1: a JSON list of the choices' texts.
            "response_text": (
                texts[0] if len(texts) == 1 else json.dumps(texts, ensure_ascii=False)
            )
            if texts
            else None,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "latency_ms": (time.perf_counter() - self.t0) * 1000,
            "status": self.status,
            "error_code": self.error_code,
            "stream": self.stream,
            "policy_action": self.policy_action,
            "watermark_key_id": self.watermark_key_id,
        }


def _clip(value, n: int) -> str | None:
    return value[:n] if isinstance(value, str) else None


__all__ = ["MAX_LOGGED_INVALID_BODY", "RequestLog"]
