"""One frozen config for detection: window sizes, strides, the target false-positive rate.

A pydantic model whose fields carry their help text, as the distill configs are: `detect`'s CLI
options read their defaults and help from it (``distillguard.cli.options``), and a calibration
file stores it as a dict (:meth:`DetectConfig.to_dict`, read back by :meth:`from_dict`).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WrapValidator, model_validator

from distillguard.errors import ConfigError


def _keep_int(value: Any, handler) -> Any:
    # An int stays an int, as the dataclass this replaced kept it: `target_fpr=0` is refused as
    # "target FPR 0", and a calibration file written from an int reads back equal.
    return value if type(value) is int else handler(value)


Number = Annotated[float, WrapValidator(_keep_int)]

# each must be a positive integer
COUNTS = (
    "window",
    "stride",
    "min_prompts",
    "reference_size",
    "topics",
    "history",
    "link_min_evidence",
    "embed_every",
    "embed_after",
    "embed_every_flagged",
)


class DetectConfig(BaseModel):
    """Frozen (build another with :meth:`replace`), unknown options refused, bad values raised as
    :class:`ConfigError`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    target_fpr: Number = Field(
        0.001,
        description="false-positive rate per benign account-day to calibrate to (flagged benign "
        "account-days / benign account-days)",
    )
    detectors: tuple[str, ...] = Field(
        (), description="detectors to calibrate with; empty: every registered detector"
    )
    window: int = Field(64, description="prompts per sliding window of the embedding tests")
    stride: int = Field(
        16, description="re-run the embedding tests every this many embedded prompts"
    )
    min_prompts: int = Field(16, description="embedding tests stay silent below this many prompts")
    reference_size: int = Field(
        256, description="benign prompts the MMD test compares a window with"
    )
    topics: int = Field(32, description="k-means topic clusters of the benign reference (coverage)")
    history: int = Field(
        256, description="features kept per account (replayed when accounts are linked)"
    )
    link_min_evidence: int = Field(
        3,
        description="shared items (near-duplicate prompts, templates, /24, system prompt) before "
        "a pair of accounts is weighed (linking.py)",
    )
    # throughput: embedding is most of detection's cost (bench/detect_throughput.py)
    embed_every: int = Field(
        8, description="embed 1 in this many prompts of an account after its first window"
    )
    embed_after: int = Field(
        16,
        description="defer an account's prompts until it has sent this many (at most min_prompts: "
        "no score changes)",
    )
    embed_every_flagged: int = Field(
        32, description="embed 1 in this many prompts of a flagged account (the evidence is in)"
    )
    embed_followups: bool = Field(
        False,
        description="embed follow-up turns too (a conversation stays on its first turn's topic)",
    )
    tail_extrapolation: Number = Field(
        1e4,
        description="a fitted benign tail may fall this far below 1/(n+1) (stats.EmpiricalTail; "
        "1: off)",
    )
    extra: dict = Field(default_factory=dict, description="per-detector options of plugins")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            error = exc.errors(include_url=False)[0]
            name = ".".join(str(p) for p in error["loc"])
            if error["type"] == "extra_forbidden":
                raise ConfigError(
                    f"unknown detect option {name!r}; use one of {', '.join(type(self).model_fields)}"
                ) from None
            raise ConfigError(f"detect option {name}={error['input']!r}: {error['msg']}") from None

    @model_validator(mode="after")
    def _check(self) -> DetectConfig:
        # the messages of the dataclass this replaced, word for word
        if not 0 < self.target_fpr < 1:
            raise ConfigError(
                f"target FPR {self.target_fpr} must lie in (0, 1), e.g. 0.001 for 0.1%"
            )
        for name in COUNTS:
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"detect option {name}={getattr(self, name)} must be a positive integer"
                )
        if self.tail_extrapolation < 1:
            raise ConfigError(
                f"tail_extrapolation={self.tail_extrapolation} must be >= 1 (1 = no extrapolation)"
            )
        if self.embed_after > self.window:
            raise ConfigError(
                f"embed_after ({self.embed_after}) cannot exceed window ({self.window})"
            )
        if self.min_prompts > self.window:
            raise ConfigError(
                f"min_prompts ({self.min_prompts}) cannot exceed window ({self.window})"
            )
        return self

    def replace(self, **changes: Any) -> DetectConfig:
        """A copy with ``changes``, validated like a new config (``model_copy`` would skip that)."""
        return type(self)(**{**dict(self), **changes})

    def to_dict(self) -> dict:
        d = self.model_dump()
        d["detectors"] = list(self.detectors)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DetectConfig:
        unknown = set(d) - set(cls.model_fields)
        if unknown:
            raise ConfigError(f"unknown detect option(s) {sorted(unknown)} in calibration file")
        return cls(**{**d, "detectors": tuple(d.get("detectors", ()))})
