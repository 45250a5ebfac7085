"""One online detector for every replica (``distillguard monitor``): the ledger feed, the
checkpoint, and real gateway replicas behind a round-robin client.

The calibration uses the detectors that need no embeddings (as tests/guard/test_online.py), on
small synthetic benign traffic, to keep the tests fast."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

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
from tests.servers import new_postgres_database, run_cli, server_process

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


def test_gaps_split_around_the_rows_that_turn_up():
    feed = LedgerFeed(engine=None)
    feed.gaps = [[1, 10, 0.0], [20, 20, 0.0], [30, 1_000_000, 0.0]]
    feed._fill({1, 5, 10, 20, 31, 999_999, 1_000_000, 2_000_000})
    assert feed.gaps == [[2, 4, 0.0], [6, 9, 0.0], [30, 30, 0.0], [32, 999_998, 0.0]]
    assert feed.lagging == 3 + 4 + 1 + 999_967


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

    def close(self) -> None:
        self.engine.dispose()

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


@pytest.fixture(params=["sqlite", "postgresql"])
def new_ledger(request, tmp_path):
    """A function returning the URL of a new, empty ledger on the parametrised database."""
    if request.param == "sqlite":
        return lambda name: f"sqlite:///{tmp_path / name}.db"
    server = request.getfixturevalue("postgres_server")
    return lambda name: new_postgres_database(server)


def test_a_restart_from_the_checkpoint_loses_nothing_and_counts_nothing_twice(
    tmp_path, calibration_file, new_ledger
):
    recs = _traffic()
    half, three_quarters = len(recs) // 2, 3 * len(recs) // 4

    ref = _Run(new_ledger("ref"), calibration_file, tmp_path / "ref")
    import_traffic(ref.engine, _lines(recs))
    ref.until_idle()
    flags, seen = ref.counts()
    assert flags.get("harvester", 0) > 20 and all(f"hydra{k}" in flags for k in range(3))
    assert not [a for a in flags if a.startswith("person")]
    assert seen == {a: sum(r["account"] == a for r in recs) for a in seen}

    db, state = new_ledger("live"), tmp_path / "live"
    first = _Run(db, calibration_file, state)
    import_traffic(first.engine, _lines(recs[:half]))
    first.until_idle()  # checkpoint at half
    # requests after the checkpoint that a detector killed with -9 had scored and acted on
    import_traffic(first.engine, _lines(recs[half:three_quarters]))
    first.service.every_n = 10**9
    first.service.step(threading.Event())
    assert read_header(state / "detector.ckpt")["requests"] == half
    first.close()  # kill -9: its memory is gone, the verdicts it recorded stay

    second = _Run(db, calibration_file, state)
    header = second.service.restore()
    assert header["requests"] == half
    import_traffic(second.engine, _lines(recs[three_quarters:]))
    second.until_idle()
    assert second.service.requests == len(recs)  # the restored half plus the rest, once each
    assert second.counts() == (flags, seen)
    assert second.verdicts() == ref.verdicts()
    ref.close()
    second.close()


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

    # the same refusal at the command line: a one-line error naming the way out, exit code 2
    refused = run_cli("monitor", "--db", db, "-c", str(other_cal), "--state", str(state))
    assert refused.returncode == 2 and "--rebuild" in refused.stderr, refused.stderr
    status = run_cli("monitor", "-c", str(calibration_file), "--state", str(state), "--status")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["requests"] == run.service.requests > 0

    other = _Run(f"sqlite:///{tmp_path / 'b.db'}", calibration_file, state)
    import_traffic(other.engine, _lines(_traffic(seed=4)[:400]))
    with pytest.raises(ConfigError, match="belongs to another ledger"):
        other.service.restore()
    run.close()
    other.close()


# ---- real replicas --------------------------------------------------------------------------

ADMIN = "admin-" + uuid.uuid4().hex
POLICY = {
    "ladder": {
        "watch": ["log"],
        "suspect": ["log", "limit_logprobs"],
        "extracting": ["log", "limit_logprobs"],
    }
}
CAMPAIGN = 60  # harvester requests
EXTRACTING_AFTER = "15"


def _keys(db: str) -> dict[str, str]:
    out = {}
    for account in ("harvester", "person-a", "person-b"):
        made = run_cli("keys", "create", "--account", account, "--db", db, "--json")
        assert made.returncode == 0, made.stderr
        out[account] = json.loads(made.stdout)["key"]
    return out


class _Client:
    """Round-robin over the replicas, one request at a time, as a load balancer would."""

    def __init__(self, urls: list[str], keys: dict[str, str]):
        self.http = [httpx.Client(base_url=u, timeout=60) for u in urls]
        self.keys = keys
        self.sent = 0

    def ask(self, account: str, messages: list[dict], **params) -> dict:
        http = self.http[self.sent % len(self.http)]
        self.sent += 1
        r = http.post(
            "/v1/chat/completions",
            headers={"Authorization": f"Bearer {self.keys[account]}"},
            json={"model": "tiny", "messages": messages, "max_tokens": 2, **params},
        )
        assert r.status_code == 200, r.text
        return r.json()

    def harvest(self, start: int, stop: int) -> list[dict]:
        return [
            self.ask(
                "harvester",
                [{"role": "user", "content": f"Explain topic {i} step by step."}],
                logprobs=True,
                top_logprobs=5,
                temperature=0,
            )
            for i in range(start, stop)
        ]

    def converse(self, account: str) -> None:
        history: list[dict] = []
        for turn in ("how do I repot a fern?", "and how often should I water it?", "what soil?"):
            history.append({"role": "user", "content": turn})
            answer = self.ask(account, history)["choices"][0]["message"]["content"]
            history.append({"role": "assistant", "content": answer})

    def close(self) -> None:
        for h in self.http:
            h.close()


def _flagged_at(db: str) -> dict[str, int]:
    """level -> the 1-based index, among the harvester's requests in the ledger, of the request
    after which that level was recorded."""
    with _connect(db) as conn:
        ids = list(
            conn.execute(
                select(LedgerRow.request_id)
                .where(LedgerRow.account_id == "harvester")
                .order_by(LedgerRow.id)
            ).scalars()
        )
        rows = conn.execute(
            select(Verdict.level, Verdict.request_id)
            .where(Verdict.account_id == "harvester")
            .order_by(Verdict.id)
        ).all()
    names = {1: "watch", 2: "suspect", 3: "extracting"}
    return {names[level]: ids.index(rid) + 1 for level, rid in rows}


@contextmanager
def _connect(db: str):
    engine = make_engine(db)
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


def _verdicts(db: str) -> list[tuple]:
    with _connect(db) as conn:
        return [
            tuple(r)
            for r in conn.execute(
                select(Verdict.account_id, Verdict.level, Verdict.request_id).order_by(Verdict.id)
            )
        ]


def _monitor(db: str, cal: Path, state: Path, *extra: str, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            distillguard_command(
                "monitor",
                "--db",
                db,
                "-c",
                str(cal),
                "--state",
                str(state),
                "--extracting-after",
                EXTRACTING_AFTER,
                "--poll",
                "0.05",
                "--checkpoint-every",
                "0.2",
                "--lease-ttl",  # a restart after kill -9 waits this long for the dead one's lease
                "2",
                *extra,
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _caught_up(db: str, state: Path, proc: subprocess.Popen, timeout_s: float = 120) -> dict:
    """Wait until the running monitor's checkpoint covers every row of the ledger."""
    with _connect(db) as conn:
        top = conn.execute(select(func.max(LedgerRow.id))).scalar()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the monitor exited"
        path = state / "detector.ckpt"
        if path.exists():
            header = read_header(path)
            if header["cursor"]["high"] >= top:
                return header
        time.sleep(0.1)
    raise AssertionError(f"the monitor did not reach ledger row {top} in {timeout_s} s")


def _stop(proc: subprocess.Popen, sig: int) -> int:
    proc.send_signal(sig)
    return proc.wait(60)


@pytest.fixture(scope="module")
def one_gateway(tmp_path_factory, calibration_file) -> dict[str, int]:
    """The reference: one gateway, its in-process monitor, the same calibration and campaign;
    run once for both databases' replica tests. Returns where it flagged the harvester."""
    tmp_path = tmp_path_factory.mktemp("one")
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))
    one = f"sqlite:///{tmp_path / 'one.db'}"
    keys = _keys(one)
    with server_process(
        *_common(policy),
        "--db",
        one,
        "--detect",
        str(calibration_file),
        "--extracting-after",
        EXTRACTING_AFTER,
        env=ENV,
    ) as gw:
        client = _Client([gw.url], keys)
        client.converse("person-a")
        client.harvest(0, CAMPAIGN)
        client.converse("person-b")
        client.close()
        time.sleep(1.0)  # the in-process monitor drains its queue off the request path
    ref = _flagged_at(one)
    assert set(ref) >= {"suspect", "extracting"}, ref
    assert {a for a, _, _ in _verdicts(one)} == {"harvester"}
    return ref


ENV = {"DISTILLGUARD_ADMIN_KEY": ADMIN, "DISTILLGUARD_VERDICT_CACHE_TTL_S": "0"}


def _common(policy: Path) -> tuple[str, ...]:
    return ("--model", "tiny", "--policy", str(policy), "--no-watermark")


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 3 gateways, 4 monitors and 2 CLI runs: 674 s under a load of 30
def test_two_replicas_one_external_detector_flag_as_one_gateway_across_restarts(
    tmp_path, calibration_file, one_gateway, new_ledger
):
    ref = one_gateway
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))
    env, common = ENV, _common(policy)

    # two replicas on one ledger, detection left to one monitor process that is killed (-9),
    # restarted, stopped (SIGTERM) and restarted during the campaign. On PostgreSQL (the
    # replicas' commits can land out of id order) a shorter run, for CI's time: the kill -9 and
    # its restart, without the SIGTERM restart and the replay by a fresh monitor.
    two = new_ledger("two")
    full = two.startswith("sqlite")
    keys = _keys(two)
    state, log = tmp_path / "state", tmp_path / "monitor.log"
    cal = calibration_file
    replica = (*common, "--db", two, "--detect", "external")
    with server_process(*replica, env=env) as a, server_process(*replica, env=env) as b:
        client = _Client([a.url, b.url], keys)
        mon = _monitor(two, cal, state, log=log)
        client.converse("person-a")
        first = client.harvest(0, 12)
        assert _stop(mon, signal.SIGKILL) == -signal.SIGKILL
        client.harvest(12, 30)  # nobody detecting: served, recorded, not yet judged
        mon = _monitor(two, cal, state, log=log)
        _caught_up(two, state, mon)
        client.harvest(30, 40)
        if full:
            assert _stop(mon, signal.SIGTERM) == 0  # saves its state on the way out
        client.harvest(40, 48)
        if full:
            mon = _monitor(two, cal, state, log=log)
        _caught_up(two, state, mon)
        last = client.harvest(48, CAMPAIGN)
        client.converse("person-b")
        _caught_up(two, state, mon)
        # the verdict reached both replicas: each answers the harvester without logprobs now
        after = client.harvest(CAMPAIGN, CAMPAIGN + 2)
        client.close()
        _caught_up(two, state, mon)
        assert _stop(mon, signal.SIGTERM) == 0
    header = read_header(state / "detector.ckpt")
    assert first[0]["choices"][0]["logprobs"] is not None
    assert all(r["choices"][0]["logprobs"] is None for r in [*last, *after])

    got = _flagged_at(two)
    restarts = "twice" if full else "once"
    print(f"one gateway: {ref}; two replicas + external monitor, restarted {restarts}: {got}")
    for level in ("suspect", "extracting"):
        assert abs(got[level] - ref[level]) <= 0.1 * ref[level], (level, got, ref)
    assert {a for a, _, _ in _verdicts(two)} == {"harvester"}  # no person flagged
    assert set(header["flagged"]) == {"harvester"}
    with _connect(two) as conn:
        served = conn.execute(
            select(func.count()).select_from(LedgerRow).where(LedgerRow.status == 200)
        ).scalar()
        rows = conn.execute(select(LedgerRow.__table__).order_by(LedgerRow.id)).mappings().all()
    assert header["requests"] == served  # every answered request, once
    if not full:
        return

    # the same ledger read by a monitor that never restarted: the same verdicts and flag count
    fresh = new_ledger("fresh")
    engine = make_engine(fresh)
    migrate(engine)
    with engine.begin() as conn:
        conn.execute(LedgerRow.__table__.insert(), [dict(r) for r in rows])
    engine.dispose()
    done = run_cli(
        "monitor",
        "--db",
        fresh,
        "-c",
        str(cal),
        "--state",
        str(tmp_path / "fresh-state"),
        "--extracting-after",
        EXTRACTING_AFTER,
        "--once",
    )
    assert done.returncode == 0, done.stderr
    assert _verdicts(fresh) == _verdicts(two)
    again = read_header(tmp_path / "fresh-state" / "detector.ckpt")
    assert (again["flagged"], again["requests"]) == (header["flagged"], header["requests"])
