"""One monitor per ledger: the ``leases`` row (``guard/detector_service.py``'s :class:`Lease`),
on SQLite and PostgreSQL, and at the command line (a second ``distillguard monitor`` refused in
one line, ``--wait`` taking over once the first is killed)."""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from distillguard.errors import ConfigError
from distillguard.guard.db import make_engine, migrate
from distillguard.guard.detector_service import Lease, LeaseLost
from distillguard.guard.schema import Lease as LeaseRow
from distillguard.serve.process import distillguard_command
from tests.detect.synth import benign_account
from tests.servers import run_cli

TTL = 1.0  # seconds: renewed every 1/3 s, so every wait below is a second or two


def _holder(engine) -> str | None:
    with engine.connect() as conn:
        return conn.execute(select(LeaseRow.holder)).scalar()


def test_one_holder_refused_awaited_and_taken_over_when_stale(db_url):
    engine = make_engine(db_url)
    migrate(engine)
    never = threading.Event()

    first = Lease(engine, ttl_s=TTL)
    assert first.acquire(never) and first.held()
    assert _holder(engine) == first.holder

    # a live holder (its beat moves) is refused, naming it and the way to wait
    second = Lease(engine, ttl_s=TTL)
    with pytest.raises(ConfigError, match=f"followed by monitor {first.holder}.*--wait"):
        second.acquire(never)
    assert _holder(engine) == first.holder and first.held()

    # --wait: takes the lease as soon as the holder releases it
    got = []
    waiter = threading.Thread(target=lambda: got.append(second.acquire(never, wait=True)))
    waiter.start()
    time.sleep(3 * TTL)
    assert not got and _holder(engine) == first.holder  # still waiting while the first lives
    first.release()
    waiter.join(30)
    assert got == [True] and _holder(engine) == second.holder

    # the holder dies (kill -9: no release, no more heartbeats): taken over after its ttl
    second._halt.set()
    second._thread.join()
    third = Lease(engine, ttl_s=TTL)
    t0 = time.monotonic()
    assert third.acquire(never)
    assert time.monotonic() - t0 >= TTL and _holder(engine) == third.holder

    # the dead one's self-fence: no renewal for ttl, so it no longer counts itself the holder;
    # and were it only paused, its next renewal finds the new holder and gives up
    assert not second.held()
    second._halt = threading.Event()
    second._keep()  # returns at its first renewal, which finds the row taken
    assert second.lost_to == third.holder
    with pytest.raises(LeaseLost, match=f"lost the monitor lease to {third.holder}"):
        second.check()
    assert third.held() and _holder(engine) == third.holder

    # a stop request ends a wait without taking anything
    stop = threading.Event()
    stop.set()
    assert Lease(engine, ttl_s=TTL).acquire(stop, wait=True) is False
    third.release()
    assert _holder(engine) is None
    engine.dispose()


@pytest.fixture(scope="module")
def small_calibration(tmp_path_factory) -> Path:
    from distillguard.detect import DetectConfig, calibrate

    rng = random.Random(5)
    benign = [r for i in range(150) for r in benign_account(rng, f"b{i}")]
    cal = calibrate(benign, config=DetectConfig(target_fpr=0.05, detectors=("volume", "timing")))
    path = tmp_path_factory.mktemp("cal") / "cal.npz"
    cal.save(path)
    return path


def _monitor(db: str, cal: Path, state: Path, log: Path, *extra: str) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            distillguard_command(
                "monitor", "--db", db, "-c", str(cal), "--state", str(state), *extra
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _wait_for_holder(engine, proc: subprocess.Popen, not_: str | None = None) -> str:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the monitor exited"
        holder = _holder(engine)
        if holder is not None and holder != not_:
            return holder
        time.sleep(0.1)
    raise AssertionError("no monitor took the lease in 120 s")


def test_a_second_monitor_is_refused_in_one_line_or_waits(tmp_path, small_calibration):
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    engine = make_engine(db)
    migrate(engine)
    ttl = ("--lease-ttl", "2")
    log = tmp_path / "monitors.log"
    first = _monitor(db, small_calibration, tmp_path / "state", log, *ttl)
    held = _wait_for_holder(engine, first)

    refused = run_cli(
        "monitor",
        "--db",
        db,
        "-c",
        str(small_calibration),
        "--state",
        str(tmp_path / "other"),
        *ttl,
    )
    assert refused.returncode == 2, refused.stderr
    # off a terminal the calibration's spinner prints its start and end first (cli/common.py)
    lines = [
        line
        for line in refused.stderr.strip().splitlines()
        if not line.startswith("loading detection calibration")
    ]
    assert len(lines) == 1 and held in lines[0] and "--wait" in lines[0], refused.stderr

    # --wait: waits while the first lives; the first killed (-9: no release), it takes over
    # once the lease has gone stale
    waiting = _monitor(db, small_calibration, tmp_path / "state", log, *ttl, "--wait")
    time.sleep(3)
    assert waiting.poll() is None and _holder(engine) == held
    first.kill()
    first.wait(60)
    took = _wait_for_holder(engine, waiting, not_=held)
    waiting.send_signal(signal.SIGTERM)
    assert waiting.wait(60) == 0  # releases the lease on the way out
    assert _holder(engine) is None
    said = " ".join(log.read_text().split())  # the console wraps long lines
    assert f"waiting for monitor {held}" in said
    assert f"took over the monitor lease from {held}" in said, took
    engine.dispose()
