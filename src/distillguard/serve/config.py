"""Settings of the teacher server (``distillguard serve``); env ``DISTILLGUARD_*`` or CLI flags."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServeConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DISTILLGUARD_", frozen=True, extra="forbid")

    model: str = Field("smollm2", description="model spec for the local backend (see `load_model`)")
    served_model_name: str | None = Field(None, description="id clients send as `model`; default: the spec")
    upstream: str | None = Field(None, description="proxy to this OpenAI-compatible base URL instead of a local model")
    upstream_api_key: str | None = Field(None, description="bearer key sent to the upstream server")
    upstream_timeout_s: float = Field(120.0, gt=0, description="seconds to wait for an upstream answer")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    max_batch_rows: int = Field(16, ge=1, description="rows (choices) generated together at most")
    batch_wait_ms: float = Field(5.0, ge=0, description="wait this long after an idle engine wakes, to batch arrivals")
    default_max_tokens: int = Field(1024, ge=1, description="completion cap when a request sets none")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="larger request bodies get 413")

    @property
    def model_id(self) -> str:
        return self.served_model_name or self.model
