"""The demo's settings (:class:`DemoConfig`), the campaign kinds it runs and its policy ladder,
shared by the acts in :mod:`distillguard.arena.demo` and :mod:`distillguard.arena.demo_live`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from distillguard.errors import ConfigError

KINDS = ("bulk", "template", "reasoning", "logprobs", "hydra", "slowlow")
DISTILLER = "distiller"
CANARY_DECOYS = 49  # act 4: decoy endings each canary is ranked against
# The demo's policy ladder: graduated, and without 'block' so the distiller keeps harvesting
# and the later acts have poisoned data to find (a real provider may well block instead).
POLICY = {
    "ladder": {
        "watch": ["log"],
        "suspect": ["log", "limit_logprobs", "watermark_boost"],
        "extracting": ["log", "limit_logprobs", "watermark_boost", "canary"],
    },
    "logprobs_cap": 0,
    "canary_rate": 0.25,
}

Say = Callable[[str], None]


@dataclass(frozen=True)
class DemoConfig:
    out: Path
    model: str = "smollm2"
    # act 1
    cal_accounts: int = 80
    eval_accounts: int = 40
    campaign_requests: int = 300
    target_fpr: float = 0.01
    # act 2
    users: int = 6
    user_requests: int = 3
    extract: int = 96
    max_tokens: int = (
        128  # at 64 most SmolLM2 answers are capped, and the dataset keeps finished ones
    )
    extracting_after: int = 10
    concurrency: int = 4
    threads: int = 0
    max_prompt_chars: int = (
        600  # live prompts longer than this are skipped (a small model's context)
    )
    # act 4
    student: str | None = "prune:8"
    epochs: float = 6.0  # enough passes over ~30 rows for the student to take in the canaries
    # act 5: held-out prompts the student and its control are scored on (0: not measured); few,
    # as the teacher answers each greedily to max_tokens on the machine running the demo
    quality_prompts: int = 8
    seed: int = 0
    startup_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.cal_accounts < 20 or self.eval_accounts < 1:
            raise ConfigError(
                "--cal-accounts must be at least 20 (the calibration splits them three ways) "
                "and --eval-accounts at least 1"
            )
        if (
            min(
                self.users,
                self.user_requests,
                self.extract,
                self.max_tokens,
                self.extracting_after,
                self.campaign_requests,
                self.concurrency,
                self.max_prompt_chars,
            )
            < 1
        ):
            raise ConfigError(
                "--users, --user-requests, --extract, --max-tokens, --extracting-after, "
                "--campaign-requests, --concurrency and --max-prompt-chars must be at least 1"
            )
        if not 0 < self.target_fpr < 1:
            raise ConfigError(f"--target-fpr {self.target_fpr} must be between 0 and 1")
        if self.epochs <= 0:
            raise ConfigError(f"--epochs {self.epochs} must be above 0")
        if self.quality_prompts < 0:
            raise ConfigError(
                f"--quality-prompts {self.quality_prompts} cannot be negative (0 skips act 5)"
            )
