"""The online monitor's verdict scores (``guard/monitor.py``): a detector's NaN or infinity is a
detector error, never a stored score (it read back as null and broke JSON), counted in
``distillguard_monitor_errors_total`` and logged once with the detector's name."""

from __future__ import annotations

import asyncio
import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest

from distillguard.guard.gateway import Guard, GuardConfig, RequestLog
from distillguard.guard.keys import KeyRecord
from distillguard.guard.limits import Limits
from distillguard.guard.monitor import detector_name, finite_score
from distillguard.guard.policy import Level


class BrokenScores:
    """A detector plugin whose score for request i is ``scores[i]``, at level 'suspect'."""

    def __init__(self, scores: list):
        self.scores = scores
        self.seen = 0

    def observe(self, record: dict):
        score, self.seen = self.scores[self.seen], self.seen + 1
        return SimpleNamespace(level="suspect", score=score, reasons=[f"score {score!r}"])


def run_monitor(tmp_path, monitor, n: int):
    """Finish ``n`` requests of one account through a Guard with ``monitor``; (account's level,
    its verdicts, monitor errors, the metrics page)."""

    async def scenario():
        guard = Guard(
            GuardConfig(
                db=f"sqlite:///{tmp_path / 'l.db'}",
                watermark=False,
                verdict_cache_ttl_s=0,
            ),
            monitor=monitor,
        )
        await guard.start()
        key = KeyRecord(
            id="k1",
            account="acct",
            prefix="dg-",
            name=None,
            created_at=0.0,
            revoked_at=None,
            limits=Limits(),
        )
        try:
            for i in range(n):
                log = RequestLog(client_ip="10.0.0.1", key=key)
                log.body = {"model": "tiny", "messages": [{"role": "user", "content": f"q{i}"}]}
                await guard.recorder.finish(log)
            await asyncio.to_thread(guard.monitor.stop)  # drains the queue
            level = await guard.policing.level_of("acct")
            page = guard.metrics.render().decode()
        finally:
            await guard.close()
        return level, guard.policing.recent("acct"), guard.monitor.errors, page

    return asyncio.run(scenario())


def errors_metric(page: str) -> float:
    line = next(
        ln for ln in page.splitlines() if ln.startswith("distillguard_monitor_errors_total")
    )
    return float(line.split()[-1])


def test_non_finite_scores_are_detector_errors_not_verdicts(tmp_path, caplog):
    """NaN, +inf, -inf (as float and as numpy) from a detector: no verdict written for them, each
    counted as a monitor error, one log line naming the detector; the next finite verdict is
    recorded as usual with its score."""
    bad = [math.nan, math.inf, -math.inf, np.float32("nan"), np.float64("inf")]
    monitor = BrokenScores([*bad, 2.5])
    with caplog.at_level(logging.ERROR, logger="distillguard.guard.monitor"):
        level, verdicts, errors, page = run_monitor(tmp_path, monitor, len(bad) + 1)
    assert level is Level.SUSPECT
    assert [(v["level"], v["score"], v["source"]) for v in verdicts] == [("suspect", 2.5, "online")]
    assert errors == len(bad)
    assert errors_metric(page) == len(bad)
    told = [r for r in caplog.records if "not a finite number" in r.getMessage()]
    assert len(told) == 1, [r.getMessage() for r in caplog.records]
    assert "BrokenScores" in told[0].getMessage() and "nan" in told[0].getMessage()


def test_an_account_is_not_escalated_on_a_nan_alone(tmp_path):
    level, verdicts, errors, _ = run_monitor(tmp_path, BrokenScores([math.nan] * 3), 3)
    assert level is Level.OK and verdicts == [] and errors == 3


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (None, True),
        (0, True),
        (-3.5, True),
        (np.float32(1.5), True),
        (1e308, True),
        (math.nan, False),
        (-math.inf, False),
        (np.float64("nan"), False),
        (10**400, False),  # an int past a double: not storable as one
        ("0.5", False),
        (True, False),
        (1j, False),
    ],
)
def test_finite_score(value, ok):
    assert finite_score(value) is ok


def test_detector_name_names_the_wrapped_detector():
    class Wrapper:
        monitor = BrokenScores([])

    assert detector_name(BrokenScores([])).endswith("test_monitor.BrokenScores")
    assert detector_name(Wrapper()).endswith("Wrapper(tests.guard.test_monitor.BrokenScores)")
