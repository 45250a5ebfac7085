"""``EvalConfig``: how ``distill eval`` and the pipeline's ``eval:`` section measure a student
against its teacher; the CLI's options take their defaults and help from these fields."""

from __future__ import annotations

from pydantic import Field, model_validator

from distillguard.distill.config import DistillConfig
from distillguard.distill.prompt_length import DEFAULT_MAX_PROMPT_TOKENS
from distillguard.errors import ConfigError


class EvalConfig(DistillConfig):
    teacher: str = Field(
        "smollm2", description="the teacher, loaded locally (same tokenizer as the student)"
    )
    limit: int = Field(64, description="prompts to use")
    skip: int = Field(0, description="skip this many prompts first (keep training prompts out)")
    max_new_tokens: int = Field(128, description="greedy answer length")
    max_prompt_tokens: int = Field(
        DEFAULT_MAX_PROMPT_TOKENS,
        description="leave out prompts longer than this many tokens in the teacher's chat "
        "template, after --skip and --limit chose them (so a held-out split stays held out); "
        "counted in the output; 0 keeps every prompt",
    )
    baseline: str | None = Field(
        None, description="the untrained student spec (e.g. prune:15:mlp896), for 'gap closed'"
    )

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        if self.max_prompt_tokens < 0:
            raise ConfigError(
                f"--max-prompt-tokens {self.max_prompt_tokens} cannot be negative (0 keeps every "
                "prompt)"
            )
        if self.limit < 1 or self.max_new_tokens < 1 or self.skip < 0:
            raise ConfigError(
                f"--limit {self.limit}, --max-new-tokens {self.max_new_tokens} and --skip "
                f"{self.skip}: use at least 1 prompt and 1 token, and skip 0 or more"
            )
        return self
