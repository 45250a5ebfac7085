"""``serve --detect CAL`` behind two replicas on one ledger (``guard/shared_monitor.py``): one
replica holds the ledger's monitor lease and scores every replica's requests, the other stands
by, applies its verdicts and takes over when it is killed; an external ``distillguard monitor``
holding the lease counts the same.

The calibration, the campaign, the client and the one-gateway reference are
tests/guard/test_detector_service.py's (the external monitor's replica test)."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import pytest
from sqlalchemy import func, select

from distillguard.guard.db import make_engine, migrate
from distillguard.guard.detector_service import read_header
from distillguard.guard.gateway import Guard, GuardConfig, RequestLog
from distillguard.guard.keys import KeyRecord
from distillguard.guard.lease import Lease
from distillguard.guard.limits import Limits
from distillguard.guard.online import OnlineDetection
from distillguard.guard.schema import Lease as LeaseRow
from distillguard.guard.schema import LedgerRow, Verdict
from tests.guard import test_detector_service
from tests.guard.test_detector_service import (
    CAMPAIGN,
    ENV,
    EXTRACTING_AFTER,
    POLICY,
    _Client,
    _common,
    _connect,
    _flagged_at,
    _keys,
)
from tests.servers import server_process

# the external monitor's test's fixtures: its calibration and its one-gateway reference run
calibration_file = test_detector_service.calibration_file
one_gateway = test_detector_service.one_gateway

TTL = "2"  # seconds: the survivor takes over about this long after the kill


def _lease_holder(db: str) -> str | None:
    with _connect(db) as conn:
        return conn.execute(select(LeaseRow.holder)).scalar()


def _pid(holder: str) -> int:
    return int(holder.split(":")[1])  # host:pid:random (guard/lease.py)


def _verdict_rows(db: str) -> list[tuple]:
    with _connect(db) as conn:
        return [
            tuple(r)
            for r in conn.execute(
                select(Verdict.account_id, Verdict.level, Verdict.source, Verdict.holder).order_by(
                    Verdict.id
                )
            )
        ]


def _wait_level(db: str, account: str, level: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with _connect(db) as conn:
            got = conn.execute(
                select(func.max(Verdict.level)).where(Verdict.account_id == account)
            ).scalar()
        if got is not None and got >= level:
            return
        time.sleep(0.1)
    raise AssertionError(f"{account} did not reach level {level} in {timeout_s} s")


@pytest.mark.timeout(900)
def test_two_replicas_detect_in_process_as_one_gateway_across_a_kill(
    tmp_path, calibration_file, one_gateway
):
    ref = one_gateway  # one gateway, the same campaign: where it flagged the harvester
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))
    db = f"sqlite:///{tmp_path / 'two.db'}"
    keys = _keys(db)
    state = tmp_path / "state"
    replica = (
        *_common(policy),
        "--db",
        db,
        "--detect",
        str(calibration_file),
        "--extracting-after",
        EXTRACTING_AFTER,
        "--detect-state",
        str(state),
        "--detect-lease-ttl",
        TTL,
        "--detect-poll",
        "0.05",
    )
    with ExitStack() as stack, ThreadPoolExecutor(2) as pool:
        # both at once, as an orchestrator starts replicas: the lease picks one
        servers = list(
            pool.map(stack.enter_context, [server_process(*replica, env=ENV) for _ in range(2)])
        )
        holder = _lease_holder(db)
        assert holder is not None
        a, b = sorted(servers, key=lambda s: s.proc.pid != _pid(holder))  # a: the holder
        assert _pid(holder) == a.proc.pid
        said_a, said_b = (" ".join(s.log_tail().split()) for s in (a, b))
        assert f"holds the ledger's monitor lease (as {holder})" in said_a, said_a
        assert f"standing by; {holder} holds the ledger's monitor lease" in said_b, said_b

        client = _Client([a.url, b.url], keys)
        client.converse("person-a")
        client.harvest(0, 12)
        _wait_level(db, "harvester", 2)  # suspect, recorded by the holder
        # the standby applies the holder's verdict as the holder does: no logprobs from either
        both = client.harvest(12, 14)
        assert [r["choices"][0]["logprobs"] for r in both] == [None, None]
        before_kill = len(_verdict_rows(db))

        a.proc.send_signal(signal.SIGKILL)  # no release, no last checkpoint
        a.proc.wait(60)
        client.http.pop(0).close()  # the load balancer drops the dead replica
        client.harvest(14, CAMPAIGN)
        client.converse("person-b")
        _wait_level(db, "harvester", 3)  # extracting, recorded by the survivor
        took = _lease_holder(db)
        assert _pid(took) == b.proc.pid
        said_b = " ".join(b.log_tail().split())
        assert f"took the ledger's monitor lease (as {took}) from {holder}" in said_b, said_b
        client.close()
    # b stopped with SIGTERM: it scored every row committed and saved its checkpoint

    got = _flagged_at(db)
    print(f"one gateway: {ref}; two replicas, the holder killed at request 14: {got}")
    for level in ("suspect", "extracting"):
        assert abs(got[level] - ref[level]) <= 0.1 * ref[level], (level, got, ref)
    rows = _verdict_rows(db)
    assert {a for a, *_ in rows} == {"harvester"}  # no person flagged
    assert {s for _, _, s, _ in rows} == {"online"}
    # one writer at a time: the killed holder's verdicts, then only the survivor's
    writers = [h for *_, h in rows]
    assert writers == [holder] * before_kill + [took] * (len(rows) - before_kill), writers
    header = read_header(state / "detector.ckpt")
    with _connect(db) as conn:
        served = conn.execute(
            select(func.count()).select_from(LedgerRow).where(LedgerRow.status == 200)
        ).scalar()
    assert header["requests"] == served  # every answered request, once, across the takeover
    assert set(header["flagged"]) == {"harvester"}


# ---- in one process: the roles, and an external monitor's lease ------------------------------


def _guard(tmp_path, cal, **config) -> Guard:
    return Guard(
        GuardConfig(
            db=f"sqlite:///{tmp_path / 'l.db'}",
            watermark=False,
            verdict_cache_ttl_s=0,
            detect_calibration=str(cal),
            extracting_after=15,
            detect_lease_ttl_s=1.0,
            detect_poll_s=0.05,
            **config,
        ),
        monitor=OnlineDetection.from_calibration(cal, extracting_after=15),
    )


def _finish(guard: Guard, account: str, i: int):
    key = KeyRecord(
        id=f"k-{account}",
        account=account,
        prefix="dg-",
        name=None,
        created_at=0.0,
        revoked_at=None,
        limits=Limits(),
    )
    log = RequestLog(client_ip="10.0.0.1", key=key)
    log.body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": f"Explain topic {i} step by step."}],
        "max_tokens": 1024,
        "logprobs": True,
        "top_logprobs": 20,
        "temperature": 0,
    }
    log.texts = {0: f"Topic {i} is explained in three steps."}
    log.prompt_tokens, log.completion_tokens, log.status = 12, 40, 200
    return guard.recorder.finish(log)


def test_an_external_monitors_lease_makes_every_replica_stand_by(
    tmp_path, calibration_file, caplog
):
    """A lease held the way ``distillguard monitor`` holds it: two gateways with ``--detect CAL``
    both stand by, say whom they follow and write no verdict; the monitor gone, exactly one of
    them takes the lease, and it scores both gateways' requests (those sent before it took over
    included, from the ledger), writing every verdict itself."""
    import asyncio

    engine = make_engine(f"sqlite:///{tmp_path / 'l.db'}")
    migrate(engine)
    external = Lease(engine, ttl_s=1.0)
    assert external.acquire(threading.Event())

    async def scenario():
        one, two = _guard(tmp_path, calibration_file), _guard(tmp_path, calibration_file)
        with caplog.at_level(logging.INFO, logger="distillguard.guard.shared_monitor"):
            await one.start()
            await two.start()
        try:
            assert not one.monitor.holding and not two.monitor.holding
            said = [r.getMessage() for r in caplog.records]
            assert sum(f"standing by; {external.holder} holds" in m for m in said) == 2, said
            for i in range(20):  # alternating, as a load balancer sends them
                await _finish((one, two)[i % 2], "harvester", i)
            await asyncio.sleep(0.5)
            assert one.policing.recent() == []  # nobody detects while the monitor holds it

            external.release()  # the monitor stops
            deadline = time.monotonic() + 30
            while not (one.monitor.holding or two.monitor.holding):
                assert time.monotonic() < deadline, "no gateway took the free lease"
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)  # the other one's next look finds it held
            assert one.monitor.holding != two.monitor.holding
            holder = one if one.monitor.holding else two
            for i in range(20, 60):
                await _finish((one, two)[i % 2], "harvester", i)
            deadline = time.monotonic() + 60
            while holder.monitor.service.requests < 60:
                assert time.monotonic() < deadline, holder.monitor.service.requests
                await asyncio.sleep(0.05)
            verdicts = one.policing.recent()
        finally:
            await one.close()
            await two.close()
        return holder.monitor.lease.holder, verdicts

    holder, verdicts = asyncio.run(scenario())
    assert verdicts and {v["account_id"] for v in verdicts} == {"harvester"}
    assert {v["holder"] for v in verdicts} == {holder}
    with engine.connect() as conn:
        assert conn.execute(select(LeaseRow.holder)).scalar() is None  # released at close
    engine.dispose()
    assert os.path.isdir(f"{tmp_path / 'l.db'}.detector")  # the default state dir, by SQLite


def test_a_holder_whose_heartbeat_stalled_stops_writing_and_stands_by(
    tmp_path, calibration_file, caplog
):
    """The holder's heartbeat stalls (a paused process, a ledger out of reach) and another
    monitor takes the lease: the old holder's next batch finds the lease gone and writes no
    verdict; it stands by, and takes the lease back once it is free, scoring what it missed."""
    import asyncio

    engine = make_engine(f"sqlite:///{tmp_path / 'l.db'}")
    migrate(engine)

    async def scenario():
        gw = _guard(tmp_path, calibration_file)
        await gw.start()
        try:
            assert gw.monitor.holding
            mine = gw.monitor.lease.holder
            stalled = gw.monitor.lease
            stalled._halt.set()  # its renewals stop, as in a paused process
            stalled._thread.join()
            other = Lease(engine, ttl_s=1.0)
            assert other.acquire(threading.Event())  # after watching the beat stand still
            with caplog.at_level(logging.INFO, logger="distillguard.guard.shared_monitor"):
                for i in range(30):
                    await _finish(gw, "harvester", i)
                deadline = time.monotonic() + 30
                while gw.monitor.holding:
                    assert time.monotonic() < deadline, "the fenced holder kept the lease"
                    await asyncio.sleep(0.05)
            assert gw.policing.recent() == []  # the fenced holder wrote nothing
            said = " ".join(r.getMessage() for r in caplog.records)
            assert f"lost the monitor lease to {other.holder}" in said or (
                "could not renew the monitor lease" in said
            ), said

            other.release()
            deadline = time.monotonic() + 30
            while not gw.monitor.holding or gw.monitor.service.requests < 30:
                assert time.monotonic() < deadline, "the lease was not taken back"
                await asyncio.sleep(0.05)
            verdicts = gw.policing.recent()
        finally:
            await gw.close()
        return mine, verdicts

    mine, verdicts = asyncio.run(scenario())
    assert verdicts and {v["holder"] for v in verdicts} == {mine}
    engine.dispose()
