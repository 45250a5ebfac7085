"""What a radioactivity test reports (per key, Holm-corrected over keys), shared by the closed
and open tests of :mod:`distillguard.forensics.radioactivity`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from distillguard.errors import DistillguardError
from distillguard.watermark import (
    holm,
)


class SuspectAPIError(DistillguardError):
    """The suspect's API did not answer a prompt (unreachable, or an error response)."""


# ---- results ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyEvidence:
    """One key's test. ``p_value``/``log10_p`` are the test's own; ``p_holm`` corrects for all keys."""

    account: str | None
    key_id: str
    p_value: float
    log10_p: float  # exact (or exactly bounded) even when p_value underflows to 0.0
    p_holm: float
    z: float
    green_fraction: float  # closed: green pairs / scored; open: green mass / scored mass
    extra: dict = field(default_factory=dict)  # open mode: empirical_p, top1_log10_p, ...


@dataclass(frozen=True)
class RadioactivityResult:
    mode: str  # "closed" | "open"
    test: str
    alpha: float
    texts: int
    scored: int  # closed: distinct (context, token) pairs; open: distinct contexts
    gamma: float
    keys: list[KeyEvidence]
    null: dict | None = None  # open mode: the wrong-key distribution of the green fraction
    # the training-data n-gram filter (:mod:`.training_filter`): whether it ran, its data's
    # SHA-256, and how many units it kept of how many (None: no filter asked for)
    filter: dict | None = None

    @property
    def traced(self) -> list[str]:
        """Accounts (or key ids) whose Holm-adjusted p-value is below ``alpha``."""
        return [k.account or k.key_id for k in self.keys if k.p_holm < self.alpha]

    @property
    def closest_untraced(self) -> KeyEvidence | None:
        """The untraced key nearest to being traced: whose power a "not traced" is about."""
        left = [k for k in self.keys if k.p_holm >= self.alpha]
        return min(left, key=lambda k: k.log10_p) if left else None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["traced"] = self.traced
        near = self.closest_untraced
        # the power statement (:mod:`distillguard.watermark.power`) of the key nearest to
        # being traced; every key's is in its ``extra["power"]``
        out["power"] = (
            {"account": near.account or near.key_id, **near.extra["power"]}
            if near is not None and "power" in near.extra
            else None
        )
        return out


def _holm_from_log10(log10_ps: Sequence[float]) -> list[float]:
    # p-values below 1e-300 keep their order through the clip; Holm adjusts the clipped values.
    return holm([10 ** max(lp, -300) for lp in log10_ps])


def _tokenize(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return [list(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
