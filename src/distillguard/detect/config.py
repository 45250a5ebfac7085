"""One frozen config for detection: window sizes, strides, the target false-positive rate."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from distillguard.errors import ConfigError


@dataclass(frozen=True)
class DetectConfig:
    target_fpr: float = 0.001  # flagged benign account-days / benign account-days
    detectors: tuple[str, ...] = ()  # empty: every registered detector
    window: int = 64  # prompts per sliding window of the embedding tests
    stride: int = 16  # re-run the embedding tests every `stride` embedded prompts
    min_prompts: int = 16  # embedding tests stay silent below this many prompts
    reference_size: int = 256  # benign prompts the MMD test compares a window with
    topics: int = 32  # k-means topic clusters of the benign reference (coverage)
    history: int = 256  # features kept per account (replayed when accounts are linked)
    link_min_evidence: int = 3  # shared items (near-duplicate prompts, templates, /24, system prompt) before a pair is weighed (linking.py)
    embed_every: int = 8  # embed 1 in k prompts of an account after its first `window` (throughput)
    embed_after: int = 16  # defer an account's prompts until it has sent this many (<= min_prompts: no score changes)
    embed_every_flagged: int = 32  # embed 1 in k prompts of a flagged account (the evidence is in)
    embed_followups: bool = (
        False  # embed follow-up turns too (a conversation stays on its first turn's topic)
    )
    tail_extrapolation: float = (
        1e4  # a fitted benign tail may fall this far below 1/(n+1) (stats.EmpiricalTail; 1 = off)
    )
    extra: dict = field(default_factory=dict)  # per-detector options of plugins

    def __post_init__(self):
        if not 0 < self.target_fpr < 1:
            raise ConfigError(
                f"target FPR {self.target_fpr} must lie in (0, 1), e.g. 0.001 for 0.1%"
            )
        for name in (
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
        ):
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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["detectors"] = list(self.detectors)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DetectConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown detect option(s) {sorted(unknown)} in calibration file")
        return cls(**{**d, "detectors": tuple(d.get("detectors", ()))})
