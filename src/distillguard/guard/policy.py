"""Graduated countermeasures: what the gateway does to an account at each verdict level.

Detection (``distillguard.detect``) or an admin puts an account at a :class:`Level`; the
:class:`PolicyConfig` ladder maps each level to actions, and :meth:`PolicyConfig.decide` turns
the level into a :class:`Decision` the gateway applies to the account's next requests. The
default ladder::

    ok          nothing
    watch       log
    suspect     log, alert, throttle, limit_logprobs, watermark_boost
    extracting  log, alert, throttle, limit_logprobs, watermark_boost, canary
    blocked     log, block                                   (set by an admin only)

Why block is a level of its own, which only an admin sets (``ADMIN_ONLY``; online detection
stops at ``extracting``, :data:`MAX_AUTOMATIC`), rather than an action of ``extracting``:

- evidence first: canaries are what ``forensics canaries`` later finds in a suspect model, and
  an account must be served to be served canaries. When ``extracting`` blocked, its 403 came
  before any canary, so the default ladder could never gather that evidence (issue 28);
- a person decides the one irreversible-looking step: a benign account flagged by mistake
  (about 0.1% of accounts, docs/policies.md) is slowed and partly fed canaries, never cut off
  by a detector alone; the ``alert`` at ``suspect`` and ``extracting`` tells the admin to look;
- the harvester gains nothing from the wait: its answers are throttled, stripped of logprobs,
  watermarked harder and 10% fabricated, each fabrication recorded in the ledger.

A ladder may still put ``block`` at any level (a provider who wants detectors to cut accounts
off says so in its policy file); a ladder that names no ``blocked`` level gets the default's
for it, so an admin's ``blocked`` verdict always blocks unless the file says otherwise.

Actions (the ``ACTIONS`` registry; every action taken is recorded in the request's ledger row,
``policy_action``):

- ``log``: record the level on every request (``policy_action``), nothing else changes;
- ``alert``: POST the verdict to ``alert_webhook`` once, when the account reaches the level;
- ``throttle``: the key's rpm/tpm limits times ``throttle_factor`` (``throttle_rpm`` /
  ``throttle_tpm`` for keys that have none);
- ``limit_logprobs``: ``top_logprobs`` capped at ``logprobs_cap`` (0 strips logprobs);
- ``watermark_boost``: the account's own watermark key with δ = ``watermark_boost_delta`` (the
  same key id and green lists: detection and tracing are unchanged, only stronger);
- ``antidistill``: antidistillation sampling with strength ``antidistill_lambda`` (Savani et al.
  2025; ``serve/antidistill.py``): answers stay fluent but teach a student less. Local
  models only, and only where the server was given a direction (``serve`` computes one when a
  ladder uses the action); elsewhere it is recorded as not applied;
- ``canary``: a share ``canary_rate`` of answers are canaries, account-specific fabricated
  statements recorded in the ledger: a model that later reproduces one learned from this account;
- ``block``: 403 ``account_blocked``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from enum import IntEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from distillguard.errors import ConfigError
from distillguard.guard.limits import Limits


class Level(IntEnum):
    OK = 0
    WATCH = 1
    SUSPECT = 2
    EXTRACTING = 3
    BLOCKED = 4  # admin-only (ADMIN_ONLY): online detection never reaches it

    @classmethod
    def parse(cls, value: str | int) -> Level:
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                return cls(value)
            except ValueError:
                pass
        elif isinstance(value, str) and value.upper() in cls.__members__:
            return cls[value.upper()]
        names = ", ".join(m.name.lower() for m in cls)
        raise ConfigError(
            f"unknown verdict level {value!r}: use one of {names} (or 0-{len(cls) - 1})"
        )


# The highest level a detector (any verdict source but "admin") may record: higher ones are for a
# person to set (guard/verdicts.py caps them).
MAX_AUTOMATIC = Level.EXTRACTING
ADMIN_ONLY = frozenset(level for level in Level if level > MAX_AUTOMATIC)

ACTIONS: dict[str, str] = {
    "log": "record the level in the ledger (policy_action) on every request",
    "alert": "POST the verdict to the alert webhook when the account reaches the level",
    "throttle": "tighter rate limits (throttle_factor x the key's rpm/tpm)",
    "limit_logprobs": "cap top_logprobs at logprobs_cap (0 strips logprobs)",
    "watermark_boost": "the account's watermark with a stronger bias (watermark_boost_delta)",
    "antidistill": "antidistillation sampling: answers that teach a student less (antidistill_lambda)",
    "canary": "answer a share canary_rate of requests with recorded, account-specific canaries",
    "block": "refuse every request with 403 account_blocked",
}

DEFAULT_LADDER = {
    "watch": ["log"],
    "suspect": ["log", "alert", "throttle", "limit_logprobs", "watermark_boost"],
    # suspect's countermeasures stay on (escalation never loosens), plus canaries: the
    # account is still served, so the evidence forensics needs is gathered
    "extracting": ["log", "alert", "throttle", "limit_logprobs", "watermark_boost", "canary"],
    "blocked": ["log", "block"],
}


@dataclass(frozen=True)
class Decision:
    """What the gateway does to one request of an account at ``level``."""

    level: Level
    actions: tuple[str, ...] = ()
    throttle_factor: float | None = None
    throttle_rpm: int | None = None
    throttle_tpm: int | None = None
    logprobs_cap: int | None = None
    watermark_delta: float | None = None
    antidistill: float = 0.0
    canary_rate: float = 0.0

    @property
    def block(self) -> bool:
        return "block" in self.actions

    @property
    def alert(self) -> bool:
        return "alert" in self.actions

    def limits(self, limits: Limits) -> Limits:
        """The key's limits under this decision (tighter when throttled, never looser)."""
        if self.throttle_factor is None:
            return limits
        f = self.throttle_factor
        rpm = max(1, int(limits.rpm * f)) if limits.rpm else self.throttle_rpm
        tpm = max(1, int(limits.tpm * f)) if limits.tpm else self.throttle_tpm
        return replace(limits, rpm=rpm, tpm=tpm)

    def is_canary(self, request_id: str) -> bool:
        """Whether this request is answered with a canary: a deterministic share of requests."""
        if self.canary_rate <= 0:
            return False
        h = int.from_bytes(hashlib.sha256(b"canary:" + request_id.encode()).digest()[:8], "big")
        return h / 2**64 < self.canary_rate

    def label(self, applied: list[str]) -> str | None:
        """The ``policy_action`` recorded in the ledger: level and the actions applied."""
        if self.level == Level.OK:
            return None
        return f"{self.level.name.lower()}:" + ",".join(applied or ["none"])


class PolicyConfig(BaseModel):
    """The ladder of countermeasures, per verdict level (a YAML/JSON file for ``serve --policy``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ladder: dict[str, list[str]] = Field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_LADDER.items()},
        description="level name -> actions (see ACTIONS)",
    )
    throttle_factor: float = Field(0.25, gt=0, le=1, description="multiplies the key's rpm and tpm")
    throttle_rpm: int = Field(6, ge=1, description="rpm of a throttled key that has no rpm limit")
    # 16k: a benign multi-turn user (long prompts carry the conversation) throttled by mistake
    # loses 0.2% of requests; 4k cost 3.3% (bench/policy_impact.py)
    throttle_tpm: int = Field(
        16_000, ge=1, description="tpm of a throttled key that has no tpm limit"
    )
    logprobs_cap: int = Field(
        0, ge=0, le=20, description="top_logprobs allowed under limit_logprobs (0: none)"
    )
    watermark_boost_delta: float = Field(
        4.0, gt=0, description="watermark bias under watermark_boost"
    )
    antidistill_lambda: float = Field(
        1.0,
        gt=0,
        le=20,
        description="strength of antidistillation sampling "
        "(nats per unit of typical Δ; bench/antidistill.py measures its cost)",
    )
    canary_rate: float = Field(
        0.1, ge=0, le=1, description="share of answers that are canaries under canary"
    )
    alert_webhook: str | None = Field(None, description="URL that receives alerts (JSON POST)")

    @field_validator("ladder")
    @classmethod
    def _check_ladder(cls, ladder: dict[str, list[str]]) -> dict[str, list[str]]:
        levels = []
        for level, actions in ladder.items():
            try:
                parsed = Level.parse(level)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
            levels.append(parsed)
            if parsed == Level.OK and actions:
                raise ValueError(
                    "level 'ok' takes no actions (it is every account that nothing flagged)"
                )
            unknown = [a for a in actions if a not in ACTIONS]
            if unknown:
                raise ValueError(
                    f"unknown action(s) {unknown} for level {level!r}: use {sorted(ACTIONS)}"
                )
        if len(set(levels)) < len(levels):
            raise ValueError(f"a level is named twice in the ladder {list(ladder)}")
        if Level.BLOCKED not in levels:
            # an admin's "blocked" must block even under a file written before the level existed
            ladder = {**ladder, "blocked": list(DEFAULT_LADDER["blocked"])}
        return ladder

    @classmethod
    def load(cls, path: str | Path) -> PolicyConfig:
        import yaml
        from pydantic import ValidationError

        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read policy file {path}: {exc}") from None
        try:
            return cls.model_validate(data or {})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(top level)"
            raise ConfigError(f"policy file {path}: {where}: {first['msg']}") from None

    def actions_for(self, level: Level) -> tuple[str, ...]:
        for name, actions in self.ladder.items():
            if Level.parse(name) == level:
                return tuple(actions)
        return ()

    def decide(self, level: Level) -> Decision:
        actions = self.actions_for(level)
        return Decision(
            level=level,
            actions=actions,
            throttle_factor=self.throttle_factor if "throttle" in actions else None,
            throttle_rpm=self.throttle_rpm,
            throttle_tpm=self.throttle_tpm,
            logprobs_cap=self.logprobs_cap if "limit_logprobs" in actions else None,
            watermark_delta=self.watermark_boost_delta if "watermark_boost" in actions else None,
            antidistill=self.antidistill_lambda if "antidistill" in actions else 0.0,
            canary_rate=self.canary_rate if "canary" in actions else 0.0,
        )

    @property
    def uses(self) -> frozenset[str]:
        """Every action some level of the ladder takes."""
        return frozenset(a for actions in self.ladder.values() for a in actions)


__all__ = [
    "ACTIONS",
    "ADMIN_ONLY",
    "DEFAULT_LADDER",
    "MAX_AUTOMATIC",
    "Decision",
    "Level",
    "PolicyConfig",
]
