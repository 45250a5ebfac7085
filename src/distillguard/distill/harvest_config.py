"""``HarvestConfig``: how to query the teacher (where, what to ask for, how hard, within what budget),
with each setting's help text; ``distill harvest`` and ``distill self-instruct`` take their
options' defaults and help from these fields."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field, model_validator

from distillguard.distill.config import DistillConfig, Number
from distillguard.distill.prompt_length import (
    DEFAULT_MAX_PROMPT_TOKENS,
    DEFAULT_TOKENIZER,
    MAX_PROMPT_TOKENS_HELP,
    TOKENIZER_HELP,
)
from distillguard.errors import ConfigError

if TYPE_CHECKING:
    from distillguard.distill.prompts import Prompt


class HarvestConfig(DistillConfig):
    teacher: str = Field(
        description="teacher's OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1"
    )
    api_key: str | None = Field(None, description="teacher API key")
    model: str = Field("smollm2", description="model id to request")
    n: int = Field(1, description="answers per prompt (the request's n)")
    concurrency: int = Field(8, description="requests in flight at once")
    # The embedded teacher's answers to ShareGPT prompts (bench/results/harvest_answer_length.json,
    # 40 answers at temperature 0.7 with room for 1,024 tokens): median 334 tokens; 72.5% end on
    # their own, all of them within 768, and the other 27.5% run on to the 1,024 ceiling (a 135M
    # model looping), which no cap lets finish. 768 is the smallest cap at which as many answers
    # finish as at 1,024; 512 would cut 2 of those 29, 256 more than 40% of them.
    max_tokens: int = Field(
        768,
        description="max completion tokens per answer (default 768: every answer of the embedded "
        "teacher to ShareGPT prompts that ends at all, 72.5% of them, ends within it; "
        "bench/results/harvest_answer_length.json)",
    )
    temperature: Number = Field(0.7, description="sampling temperature")
    max_prompt_tokens: int = Field(DEFAULT_MAX_PROMPT_TOKENS, description=MAX_PROMPT_TOKENS_HELP)
    tokenizer: str = Field(DEFAULT_TOKENIZER, description=TOKENIZER_HELP)
    top_logprobs: int | None = Field(
        None, description="also harvest the top-K logprobs per token (0-20)"
    )
    seed: int | None = Field(None, description="request seed")
    budget_tokens: int | None = Field(
        None, description="never spend more tokens than this (all runs together)"
    )
    budget_usd: Number | None = Field(
        None, description="never spend more USD than this (needs --price-in/--price-out)"
    )
    price_in: Number = Field(0.0, description="USD per million prompt tokens")
    price_out: Number = Field(0.0, description="USD per million completion tokens")
    timeout_s: Number = Field(
        900.0,
        description="seconds per request, queueing included: a CPU teacher answering 16 "
        "requests at once can take minutes for a long answer, and a request given up is "
        "generated and billed again when retried",
    )
    max_retries: int = Field(6, description="retries on 429/5xx/timeouts")
    backoff_s: Number = Field(
        0.5,
        description="retry backoff: the n-th retry waits uniform(0, backoff_s * 2^n) seconds "
        "(full jitter), at least the server's Retry-After",
    )
    commit_window_s: Number = Field(
        0.05,
        description="group-commit answers to the store at most this many seconds apart; 0 "
        "commits each on arrival (for teachers without Idempotency-Key replay, where kill -9 "
        "could lose a window)",
    )
    commit_batch: int = Field(
        64, description="... or as soon as this many answers are waiting to be committed"
    )
    progress_interval_s: Number = Field(
        0.1, description="call on_progress at most this often (and once at the end)"
    )

    @model_validator(mode="after")
    def _check(self) -> HarvestConfig:
        if self.concurrency < 1 or self.n < 1 or self.max_tokens < 1:
            raise ConfigError("--concurrency, --n and --max-tokens must be at least 1")
        if self.max_prompt_tokens < 0:
            raise ConfigError(
                f"--max-prompt-tokens {self.max_prompt_tokens} cannot be negative (0 sends every "
                "prompt)"
            )
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            raise ConfigError(f"--top-logprobs {self.top_logprobs} must be between 0 and 20")
        if self.commit_window_s < 0 or self.commit_batch < 1:
            raise ConfigError(
                "--commit-window must be >= 0 seconds and the commit batch at least 1"
            )
        if (self.budget_usd is not None) and not (self.price_in or self.price_out):
            raise ConfigError(
                "--budget-usd needs --price-in and/or --price-out (USD per million tokens)"
            )
        if (
            not 0.0 <= self.temperature <= 2.0
        ):  # OpenAI's range; a teacher would answer 400 to every request
            raise ConfigError(f"--temperature {self.temperature} must be between 0 and 2")
        if not self.timeout_s > 0 or self.max_retries < 0 or self.backoff_s < 0:
            raise ConfigError(
                f"--timeout {self.timeout_s} must be above 0 seconds and --max-retries "
                f"{self.max_retries} at least 0 (0: one attempt, no retry)"
            )
        if (
            min(self.price_in, self.price_out) < 0
            or min(self.budget_usd or 0, self.budget_tokens or 0) < 0
        ):
            raise ConfigError("prices and budgets cannot be negative")
        return self

    @property
    def base_url(self) -> str:
        url = self.teacher.rstrip("/")
        return url if url.endswith("/v1") or "/v1/" in url else url + "/v1"

    def request(self, prompt: Prompt) -> dict:
        body = {
            "model": self.model,
            "messages": prompt.as_messages(),
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "n": self.n,
        }
        if self.top_logprobs is not None:
            body["logprobs"] = True
            body["top_logprobs"] = self.top_logprobs
        if self.seed is not None:
            body["seed"] = self.seed
        return body

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.price_in + completion_tokens * self.price_out) / 1e6
