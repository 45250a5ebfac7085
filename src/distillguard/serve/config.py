"""Settings of the teacher server (``distillguard serve``); env ``DISTILLGUARD_*`` or CLI flags.

Every field carries its help: the ``serve`` command's options read their defaults and help from
these fields (``distillguard.cli.options``), so a default is written once, here.
"""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServeConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DISTILLGUARD_", frozen=True, extra="forbid")

    model: str = Field(
        "smollm2",
        description="model spec for the local backend: smollm2 | tiny | HF id | DIR | FILE.gguf",
    )
    served_model_name: str | None = Field(
        None, description="model id clients send (default: the spec)"
    )
    upstream: str | None = Field(
        None, description="proxy to this OpenAI-compatible base URL instead of a local model"
    )
    upstream_api_key: str | None = Field(None, description="bearer key sent to the upstream server")
    upstream_timeout_s: float = Field(
        120.0, gt=0, description="seconds to wait for an upstream answer"
    )
    upstream_engine: Literal["openai", "vllm"] = Field(
        "openai",
        description="what the upstream runs: openai (any OpenAI-compatible server: no watermark) "
        "| vllm (vLLM with distillguard's logits processor: each account's watermark key goes "
        "in vllm_xargs; docs/vllm.md)",
    )
    backend: str | None = Field(
        None,
        description="what answers: local (a model in this process) | upstream (--upstream URL) | a "
        "plugin's name (entry-point group distillguard.backends); default: upstream with "
        "--upstream, else local",
    )
    threads: int = Field(
        0,
        description="torch CPU threads (0: one per core). On a machine busy with other "
        "work, 1 avoids stalls of threads waiting for each other",
    )
    host: str = Field("127.0.0.1", description="interface to listen on")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    max_batch_rows: int = Field(16, ge=1, description="rows (choices) generated together at most")
    batch_wait_ms: float = Field(
        5.0, ge=0, description="wait this long after an idle engine wakes, to batch arrivals"
    )
    default_max_tokens: int = Field(
        1024, ge=1, description="completion cap when a request sets none"
    )
    max_prompt_tokens: int | None = Field(
        None,
        ge=1,
        description="longer prompts get 400 context_length_exceeded; default: the model's context length",
    )
    prefill_chunk: int = Field(
        512,
        ge=1,
        description="prompts longer than this many tokens are prefilled in chunks of it, between "
        "decoding steps of the running batch, so they cannot stall the other requests",
    )
    max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="larger request bodies get 413"
    )
    # Who may reach what, and for how long (issue 24): see serve/server.py for what is bounded.
    forwarded_allow_ips: tuple[str, ...] = Field(
        (),
        description="proxies trusted to set X-Forwarded-For/-Proto (IPs, networks or *); none: the "
        "ledger records the peer's own address and the headers are ignored",
    )
    max_header_bytes: int = Field(
        16 * 1024, ge=1024, description="request line + headers larger than this get 431"
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="seconds: a request head not complete this long after its "
        "first byte (or the connection's start) closes it",
    )
    body_timeout_s: float = Field(
        60.0,
        gt=0,
        description="seconds: a request body not complete this long after its head closes the "
        "connection",
    )
    keep_alive_timeout_s: int = Field(
        5, ge=1, description="seconds after which an idle keep-alive connection is closed"
    )
    limit_concurrency: int | None = Field(
        None,
        ge=1,
        description="connections + requests in flight beyond this get 503 (default: unbounded)",
    )
    docs: bool = Field(False, description="serve /docs, /redoc and /openapi.json (to anyone)")

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _proxies(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            if item == "*":
                continue
            try:
                ipaddress.ip_network(
                    item
                )  # strict, as uvicorn reads it: 10.0.0.0/8, not 10.0.0.1/8
            except ValueError:
                raise ValueError(
                    f"--forwarded-allow-ips {item!r} is not an IP address, a network like "
                    "10.0.0.0/8, or *"
                ) from None
        return value

    @property
    def model_id(self) -> str:
        return self.served_model_name or self.model
