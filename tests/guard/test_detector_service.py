"""One online detector for every replica (``distillguard monitor``): the ledger feed, the
checkpoint, and real gateway replicas behind a round-robin client.

The calibration uses the detectors that need no embeddings (as tests/guard/test_online.py), on
small synthetic benign traffic, to keep the tests fast."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select, text

from distillguard.errors import ConfigError
from distillguard.guard.db import make_engine, migrate
from distillguard.guard.detector_service import (
    Checkpoint,
    DetectorService,
    LedgerFeed,
    code_fingerprint,
    file_digest,
    read_header,
)
from distillguard.guard.ledger import import_traffic
from distillguard.guard.metrics import Metrics
from distillguard.guard.online import OnlineDetection
from distillguard.guard.policy import PolicyConfig
from distillguard.guard.schema import LedgerRow, Verdict
from distillguard.guard.verdicts import Verdicts
from distillguard.serve.process import distillguard_command
from tests.detect.synth import T0, benign_account, bulk_account, record
from tests.servers import run_cli, server_process

NO_EMBEDDINGS = ("volume", "timing", "shape", "linking")


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory) -> Path:
    from distillguard.detect import DetectConfig, calibrate

    rng = random.Random(11)
    benign = [r for i in range(600) for r in benign_account(rng, f"b{i}", days=rng.randint(1, 3))]
    cal = calibrate(benign, config=DetectConfig(target_fpr=0.01, detectors=NO_EMBEDDINGS))
    path = tmp_path_factory.mktemp("cal") / "cal.npz"
    cal.save(path)
    return path


# ---- the feed -----------------------------------------------------------------------------


def _row(request_id: str) -> dict:
    return {"request_id": request_id, "ts": time.time(), "account_id": "a", "status": 200}


def test_feed_reads_rows_committed_out_of_id_order_once(postgres_url):
    """PostgreSQL numbers rows at INSERT: a later id can be visible before an earlier one. The
    feed reads the earlier one when it commits, each row once, and gives up on a number whose
    transaction rolled back only after the lag window."""
    engine = make_engine(postgres_url)
    migrate(engine)
    table = LedgerRow.__table__
    feed = LedgerFeed(engine, lag_s=60)
    with engine.connect() as slow, engine.connect() as fast, engine.connect() as aborted:
        slow.begin()
        slow.execute(table.insert().values(**_row("slow")))  # id 1, not committed yet
        aborted.begin()
        aborted.execute(table.insert().values(**_row("rolled-back")))  # id 2, will roll back
        with fast.begin():
            fast.execute(table.insert(), [_row("fast-1"), _row("fast-2")])  # ids 3, 4
        first = feed.poll(now=1000.0)
        assert [r.request_id for r in first] == ["fast-1", "fast-2"]
        assert feed.high == 4 and feed.lagging == 2  # ids 1 and 2 awaited
        # what a plain "id > last" tail would do: row 1 is below its cursor for ever
        slow.commit()
        aborted.rollback()
    second = feed.poll(now=1001.0)
    assert [r.request_id for r in second] == ["slow"]
    assert feed.lagging == 1 and feed.poll(now=1002.0) == []  # id 2 still awaited, nothing twice
    assert feed.poll(now=1061.5) == [] and feed.lagging == 0 and feed.given_up == 1
    with engine.begin() as conn:
        conn.execute(table.insert().values(**_row("later")))
    assert [r.request_id for r in feed.poll(now=1062.0)] == ["later"]
    engine.dispose()


# ---- the checkpoint -----------------------------------------------------------------------


def _traffic(seed: int = 3) -> list[dict]:
    """Benign people, one bulk harvester, and a three-key campaign sending one prompt set."""
    rng = random.Random(seed)
    recs = [r for i in range(40) for r in benign_account(rng, f"person{i}")]
    recs += bulk_account(rng, "harvester", 160)
    for k in range(3):
        recs += [
            record(
                f"hydra{k}",
                T0 + 7200 + 40 * i + 13 * k,
                f"List ten facts about subject {i}.",
                ip=f"203.0.113.{k}",
                max_tokens=1024,
            )
            for i in range(60)
        ]
    return sorted(recs, key=lambda r: r["ts"])


def _lines(recs: list[dict]) -> list[str]:
    return [json.dumps({**r, "response": {**r["response"], "status": 200}}) for r in recs]


class _Run:
    """A detector service in this process over a SQLite ledger, as ``distillguard monitor`` runs."""

    def __init__(self, db: str, cal: Path, state: Path, *, every_n: int = 10_000):
        self.engine = make_engine(db)
        migrate(self.engine)
        detection = OnlineDetection.from_calibration(cal, extracting_after=20)
        self.service = DetectorService(
            detection,
            Verdicts(self.engine, PolicyConfig(), Metrics(), cache_ttl_s=0),
            LedgerFeed(self.engine),
            Checkpoint(state, file_digest(cal), code_fingerprint(detection)),
            every_n=every_n,
        )

    def until_idle(self) -> None:
        self.service.run(threading.Event(), once=True)

    def verdicts(self) -> list[tuple]:
        with self.engine.connect() as conn:
            return [
                tuple(r)
                for r in conn.execute(
                    select(Verdict.account_id, Verdict.level, Verdict.request_id).order_by(
                        Verdict.id
                    )
                )
            ]

    def counts(self) -> tuple[dict, dict]:
        """(flagged requests per account, requests seen per account)."""
        d = self.service.detection
        return dict(d._flags), {a: s.n for a, s in d.monitor.accounts.items()}


def test_a_restart_from_the_checkpoint_loses_nothing_and_counts_nothing_twice(
    tmp_path, calibration_file
):
    recs = _traffic()
    half, three_quarters = len(recs) // 2, 3 * len(recs) // 4

    ref = _Run(f"sqlite:///{tmp_path / 'ref.db'}", calibration_file, tmp_path / "ref")
    import_traffic(ref.engine, _lines(recs))
    ref.until_idle()
    flags, seen = ref.counts()
    assert flags.get("harvester", 0) > 20 and all(f"hydra{k}" in flags for k in range(3))
    assert not [a for a in flags if a.startswith("person")]
    assert seen == {a: sum(r["account"] == a for r in recs) for a in seen}

    db, state = f"sqlite:///{tmp_path / 'live.db'}", tmp_path / "live"
    first = _Run(db, calibration_file, state)
    import_traffic(first.engine, _lines(recs[:half]))
    first.until_idle()  # checkpoint at half
    # requests after the checkpoint that a detector killed with -9 had scored and acted on
    import_traffic(first.engine, _lines(recs[half:three_quarters]))
    first.service.every_n = 10**9
    first.service.step(threading.Event())
    assert read_header(state / "detector.ckpt")["requests"] == half
    del first  # kill -9: its memory is gone, the verdicts it recorded stay

    second = _Run(db, calibration_file, state)
    header = second.service.restore()
    assert header["requests"] == half
    import_traffic(second.engine, _lines(recs[three_quarters:]))
    second.until_idle()
    assert second.service.requests == len(recs)  # the restored half plus the rest, once each
    assert second.counts() == (flags, seen)
    assert second.verdicts() == ref.verdicts()


def test_a_checkpoint_from_another_calibration_or_ledger_is_refused(tmp_path, calibration_file):
    recs = _traffic()[:400]
    db, state = f"sqlite:///{tmp_path / 'a.db'}", tmp_path / "state"
    run = _Run(db, calibration_file, state)
    import_traffic(run.engine, _lines(recs))
    run.until_idle()

    other_cal = tmp_path / "other.npz"
    other_cal.write_bytes(calibration_file.read_bytes() + b"\0")  # another file, another digest
    detection = OnlineDetection.from_calibration(calibration_file)
    stale = Checkpoint(state, file_digest(other_cal), code_fingerprint(detection))
    with pytest.raises(ConfigError, match="another calibration file.*--rebuild"):
        stale.load(detection)
    code = Checkpoint(state, file_digest(calibration_file), "0" * 64)
    with pytest.raises(ConfigError, match="another version of the detection code"):
        code.load(detection)

    other = _Run(f"sqlite:///{tmp_path / 'b.db'}", calibration_file, state)
    import_traffic(other.engine, _lines(_traffic(seed=4)[:400]))
    with pytest.raises(ConfigError, match="belongs to another ledger"):
        other.service.restore()
