"""Online detection in the gateway: :class:`distillguard.detect.AccountMonitor` verdicts become levels.

The detector speaks ``ok`` / ``watch`` / ``flag`` (calibrated to a false-positive rate per
benign account-day); the policy ladder speaks :class:`~distillguard.guard.policy.Level`. A flag
makes an account ``suspect`` (throttled, logprobs limited, stronger watermark by default); an
account still flagged ``extracting_after`` requests later, under those countermeasures, is
``extracting`` (the same, plus canaries: evidence for ``forensics canaries``). Online detection
goes no higher (``policy.MAX_AUTOMATIC``): ``blocked`` is an admin's decision. Without a
calibration there is no online detection.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from distillguard.guard.policy import Level


@dataclass(frozen=True)
class LevelVerdict:
    level: Level
    score: float
    reasons: tuple[str, ...]


class OnlineDetection:
    """The gateway's monitor (``Guard(monitor=...)``): batches of traffic records in, levels out."""

    def __init__(self, monitor, *, extracting_after: int = 100):
        if extracting_after < 1:
            from distillguard.errors import ConfigError

            raise ConfigError(
                f"extracting_after={extracting_after} must be >= 1 (flagged requests before 'extracting')"
            )
        self.monitor = monitor
        self.extracting_after = extracting_after
        self._flags: dict[str, int] = {}

    @classmethod
    def from_calibration(cls, path: str | Path, **kwargs) -> OnlineDetection:
        from distillguard.detect.calibrate import Calibration
        from distillguard.detect.monitor import AccountMonitor

        return cls(AccountMonitor(Calibration.load(path)), **kwargs)

    def _level(self, verdict) -> LevelVerdict | None:
        if verdict.level == "flag":
            n = self._flags[verdict.account] = self._flags.get(verdict.account, 0) + 1
            level = Level.EXTRACTING if n > self.extracting_after else Level.SUSPECT
        elif verdict.level == "watch":
            level = Level.WATCH
        else:
            return None
        reasons = list(verdict.reasons)
        if getattr(verdict, "cluster", None):
            reasons.append(f"linked accounts scored as one actor: cluster {verdict.cluster}")
        if level == Level.EXTRACTING:
            reasons.insert(
                0, f"still flagged {self.extracting_after} requests after the first flag"
            )
        return LevelVerdict(level=level, score=float(verdict.score), reasons=tuple(reasons))

    def observe_batch(self, records: Sequence[dict]) -> list[LevelVerdict | None]:
        return [self._level(v) for v in self.monitor.observe_batch(list(records))]

    def observe(self, record: dict) -> LevelVerdict | None:
        return self.observe_batch([record])[0]


__all__ = ["LevelVerdict", "OnlineDetection"]
