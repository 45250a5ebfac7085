"""The offline detection report (DESIGN.md "Detection report"), by replaying a traffic log.

Records are replayed in time order through one :class:`AccountMonitor`, exactly as the
gateway would see them, so ``flagged_at_request`` is the 1-based index of the request at
which the online monitor would first have flagged the account.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from distillguard.detect.calibrate import Calibration
from distillguard.detect.features import extract
from distillguard.detect.monitor import AccountMonitor


@dataclass
class AccountResult:
    account: str
    score: float = 0.0
    flagged: bool = False
    flagged_at_request: int | None = None
    reasons: list[str] = field(default_factory=list)
    cluster: str | None = None
    requests: int = 0
    label: str | None = (
        None  # ground truth from the log, for evaluation only (detectors never see it)
    )
    # evaluation only: the account scored on its own requests, linking evidence dropped (what it
    # would score if no other account of its actor, or of another actor, were linked to it)
    solo_score: float = 0.0
    solo_flagged_at_request: int | None = None

    def to_dict(self) -> dict:
        return {
            "account": self.account,
            "score": round(self.score, 4),
            "flagged": self.flagged,
            "flagged_at_request": self.flagged_at_request,
            "reasons": self.reasons,
            "cluster": self.cluster,
            "requests": self.requests,
        }


def detect(
    records: Iterable[dict],
    calibration: Calibration,
    *,
    embedder=None,
    batch: int = 256,
    progress=None,
) -> dict:
    """Score a traffic log; returns the report dict plus ``"results"`` (AccountResult objects)."""
    # only the features and the label are kept: records may stream from a file (a Parquet export
    # of a provider's ledger) and need not be held in memory
    feats_records = sorted(((extract(r), r.get("label")) for r in records), key=lambda fr: fr[0].ts)
    monitor = AccountMonitor(calibration, embedder=embedder)
    linking = monitor.names.index("linking") if "linking" in monitor.names else None
    results: dict[str, AccountResult] = {}
    for i in range(0, len(feats_records), batch):
        chunk = feats_records[i : i + batch]
        feats = [f for f, _ in chunk]
        for (f, label), (s, p) in zip(chunk, monitor.step_batch(feats)):
            res = results.get(f.account)
            if res is None:
                res = results[f.account] = AccountResult(f.account)
            res.requests = s.n
            if res.label is None and isinstance(label, str):
                res.label = label
            v = monitor._verdict(f, s, p, explain=False)
            if v.score > res.score or (v.flagged and not res.flagged):
                if v.level != "ok":  # the reasons, only for the verdict kept
                    v = monitor._verdict(f, s, p)
                res.score = max(res.score, v.score)
                res.reasons = list(v.reasons)
            if v.flagged and not res.flagged:
                res.flagged, res.flagged_at_request = True, v.request
            raw = s.raw()
            if linking is not None:
                raw[linking] = -np.inf  # p = 1: no linking evidence
            solo = monitor.combined(raw)[0]
            res.solo_score = max(res.solo_score, solo)
            if res.solo_flagged_at_request is None and solo > calibration.threshold:
                res.solo_flagged_at_request = s.n
        if progress is not None:
            progress(len(chunk))
    for a, res in results.items():
        res.cluster = monitor.linker.cluster_id(a)
    ordered = sorted(results.values(), key=lambda r: -r.score)
    return {
        "threshold": calibration.threshold,
        "target_fpr": calibration.target_fpr,
        "calibration": calibration.stats,
        "accounts": [r.to_dict() for r in ordered],
        "results": ordered,
    }
