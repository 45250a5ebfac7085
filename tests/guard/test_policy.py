"""The policy ladder: verdict levels, the actions at each, and their traces in the ledger.

Pure parts (config validation, throttled limits, canaries) on known values; then a real server
(tiny model, SQLite ledger) whose accounts are put at each level through the admin API; then
the online monitor fed by the ledger, in process.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from types import SimpleNamespace

import httpx
import pytest
from sqlalchemy import create_engine, select

from distillguard.errors import ConfigError
from distillguard.guard.canary import canary, canary_text
from distillguard.guard.limits import Limits
from distillguard.guard.policy import (
    ACTIONS,
    ADMIN_ONLY,
    MAX_AUTOMATIC,
    Decision,
    Level,
    PolicyConfig,
)
from distillguard.guard.schema import LedgerRow
from tests.servers import serve_process

ADMIN = "admin-" + uuid.uuid4().hex
SECRET = "policy-test-secret"


# ---- pure parts ---------------------------------------------------------------------------


def test_levels_parse_names_and_numbers():
    assert Level.parse("suspect") is Level.SUSPECT and Level.parse("EXTRACTING") is Level.EXTRACTING
    assert Level.parse(1) is Level.WATCH and Level.parse("blocked") is Level.BLOCKED
    for bad in ("nope", 7, True, None):
        with pytest.raises(ConfigError, match="unknown verdict level"):
            Level.parse(bad)


@pytest.mark.parametrize(
    "ladder,fragment",
    [
        ({"suspect": ["throttle", "nuke"]}, "unknown action"),
        ({"ok": ["log"]}, "takes no actions"),
        ({"sometimes": ["log"]}, "unknown verdict level"),
        ({"suspect": ["log"], "SUSPECT": ["block"]}, "named twice"),
    ],
)
def test_bad_ladders_are_refused(ladder, fragment):
    with pytest.raises(ValueError, match=fragment):
        PolicyConfig(ladder=ladder)


def test_policy_file_errors_name_the_field(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("ladder:\n  suspect: [log]\nthrottle_factor: 3\n")
    with pytest.raises(ConfigError, match="throttle_factor"):
        PolicyConfig.load(path)
    path.write_text("ladder:\n  suspect: [log, block]\ncanary_rate: 0.5\n")
    assert PolicyConfig.load(path).decide(Level.SUSPECT).block
    with pytest.raises(ConfigError, match="cannot read"):
        PolicyConfig.load(tmp_path / "missing.yaml")


def test_default_ladder_escalates():
    policy = PolicyConfig()
    assert policy.decide(Level.OK).actions == () and policy.decide(Level.OK).label([]) is None
    assert set(policy.decide(Level.SUSPECT).actions) >= {
        "throttle",
        "limit_logprobs",
        "watermark_boost",
    }
    # extracting keeps suspect's countermeasures and adds canaries: the account is still served,
    # so evidence is gathered; only the admin-only level blocks
    extracting = policy.decide(Level.EXTRACTING)
    assert set(extracting.actions) >= set(policy.decide(Level.SUSPECT).actions) | {"canary"}
    assert not extracting.block and extracting.canary_rate > 0
    assert policy.decide(Level.BLOCKED).block
    assert [level for level in Level if policy.decide(level).block] == [Level.BLOCKED]
    assert ADMIN_ONLY == {Level.BLOCKED} and MAX_AUTOMATIC is Level.EXTRACTING
    assert set(ACTIONS) >= {a for actions in policy.ladder.values() for a in actions}


def test_a_ladder_without_blocked_still_blocks_at_blocked(tmp_path):
    """A policy file written before the level existed (or that forgot it): an admin's "blocked"
    verdict must not mean "served as usual"; one that names it keeps its own actions."""
    path = tmp_path / "old.yaml"
    path.write_text("ladder:\n  suspect: [log, throttle]\n  extracting: [canary]\n")
    old = PolicyConfig.load(path)
    assert old.decide(Level.BLOCKED).block and not old.decide(Level.EXTRACTING).block
    assert (
        old.decide(Level.WATCH).actions == ()
    )  # other levels it leaves out get nothing, as before
    assert not PolicyConfig(ladder={"blocked": ["log"]}).decide(Level.BLOCKED).block


def test_throttle_tightens_limits_and_never_loosens():
    d = PolicyConfig(throttle_factor=0.25, throttle_rpm=6, throttle_tpm=900).decide(Level.SUSPECT)
    assert d.limits(Limits(rpm=100, tpm=10_000, max_concurrent=3)) == Limits(
        rpm=25, tpm=2500, max_concurrent=3
    )
    assert d.limits(Limits(rpm=2)) == Limits(
        rpm=1, tpm=900
    )  # floor of 1; a default tpm where none was set
    assert d.limits(Limits()) == Limits(rpm=6, tpm=900)
    assert Decision(level=Level.WATCH).limits(Limits(rpm=5)) == Limits(rpm=5)


def test_canary_share_is_close_to_the_rate_and_deterministic():
    d = PolicyConfig(ladder={"extracting": ["canary"]}, canary_rate=0.2).decide(Level.EXTRACTING)
    ids = [f"req-{i}" for i in range(5000)]
    share = sum(map(d.is_canary, ids)) / len(ids)
    assert abs(share - 0.2) < 4 * (0.2 * 0.8 / len(ids)) ** 0.5
    assert [d.is_canary(i) for i in ids[:50]] == [d.is_canary(i) for i in ids[:50]]


def test_canaries_are_keyed_per_secret_account_and_request():
    a = canary_text(b"s1", "acct", "req-1")
    assert a == canary_text(b"s1", "acct", "req-1")
    others = {
        canary_text(b"s2", "acct", "req-1"),
        canary_text(b"s1", "other", "req-1"),
        canary_text(b"s1", "acct", "req-2"),
    }
    assert a not in others and len(others) == 3
    opening, continuation = canary(b"s1", "acct", "req-1")
    assert a == opening + continuation and continuation.endswith(".")
    # no two of many canaries share their invented continuation: each traces to one request
    conts = {canary(b"s1", "acct", f"r{i}")[1] for i in range(300)}
    assert len(conts) > 250


# ---- a real gateway ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    root = tmp_path_factory.mktemp("policy")
    db = f"sqlite:///{root / 'ledger.db'}"
    policy = root / "policy.yaml"
    policy.write_text(
        json.dumps(
            {
                "ladder": {
                    "watch": ["log"],
                    "suspect": ["log", "throttle", "limit_logprobs", "watermark_boost"],
                    "extracting": ["block"],
                },
                "throttle_factor": 0.25,
            }
        )
    )
    canary_policy = root / "canary.yaml"
    canary_policy.write_text(json.dumps({"ladder": {"extracting": ["canary"]}, "canary_rate": 1.0}))
    env = {
        "DISTILLGUARD_ADMIN_KEY": ADMIN,
        "DISTILLGUARD_WATERMARK_SECRET": SECRET,
        "DISTILLGUARD_VERDICT_CACHE_TTL_S": "0",
    }
    with serve_process("--model", "tiny", "--db", db, "--policy", str(policy), env=env) as url:
        yield SimpleNamespace(url=url, db=db, root=root, canary_policy=canary_policy, env=env)


def admin(gw, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(
        method, gw.url + path, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30, **kw
    )


def new_key(gw, account: str, **limits) -> str:
    resp = admin(gw, "POST", "/admin/keys", json={"account": account, **limits})
    assert resp.status_code == 201, resp.text
    return resp.json()["key"]


def chat(url: str, key: str, **extra) -> httpx.Response:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        **extra,
    }
    return httpx.post(
        f"{url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )


def set_level(gw, account: str, level: str, **extra) -> httpx.Response:
    return admin(gw, "POST", f"/admin/accounts/{account}/verdict", json={"level": level, **extra})


def ledger_rows(db: str, account: str) -> list:
    engine = create_engine(db)
    try:
        with engine.connect() as conn:
            return list(
                conn.execute(
                    select(
                        LedgerRow.request_id,
                        LedgerRow.policy_action,
                        LedgerRow.status,
                        LedgerRow.error_code,
                        LedgerRow.response_text,
                        LedgerRow.watermark_key_id,
                    )
                    .where(LedgerRow.account_id == account)
                    .order_by(LedgerRow.id)
                )
            )
    finally:
        engine.dispose()


def test_levels_change_what_an_account_gets(gateway):
    key = new_key(gateway, "mallory", rpm=8)
    ok = chat(gateway.url, key, logprobs=True, top_logprobs=3)
    assert ok.status_code == 200 and ok.json()["choices"][0]["logprobs"] is not None

    assert (
        set_level(gateway, "mallory", "suspect", reasons=["logprob harvesting"]).status_code == 201
    )
    suspect = chat(gateway.url, key, logprobs=True, top_logprobs=3)
    assert (
        suspect.status_code == 200 and suspect.json()["choices"][0]["logprobs"] is None
    )  # stripped
    # throttled: rpm 8 x 0.25 = 2 per minute, and three requests went out in this minute
    limited = chat(gateway.url, key)
    assert limited.status_code == 429, limited.text

    assert set_level(gateway, "mallory", "extracting").status_code == 201
    blocked = chat(gateway.url, key)
    assert blocked.status_code == 403 and blocked.json()["error"]["code"] == "account_blocked"

    assert (
        set_level(gateway, "mallory", "ok", reasons=["false positive, cleared by hand"]).status_code
        == 201
    )
    rows = ledger_rows(gateway.db, "mallory")
    actions = [r.policy_action for r in rows]
    assert actions[0] is None
    assert actions[1] == "suspect:log,throttle,watermark_boost,limit_logprobs"
    assert rows[2].status == 429 and rows[3].status == 403 and actions[3] == "extracting:block"
    # watermark_boost keeps the account's key id: detection and tracing are unchanged
    assert rows[0].watermark_key_id == rows[1].watermark_key_id is not None

    history = admin(gateway, "GET", "/admin/verdicts", params={"account": "mallory"}).json()["data"]
    assert [v["level"] for v in history] == ["ok", "extracting", "suspect"]
    assert history[-1]["reasons"] == ["logprob harvesting"] and history[0]["source"] == "admin"


def test_an_admin_blocks_with_the_blocked_level(gateway):
    """This gateway's policy file names no 'blocked' level: it gets the default's block."""
    key = new_key(gateway, "bob")
    assert chat(gateway.url, key).status_code == 200
    assert set_level(gateway, "bob", "blocked", reasons=["confirmed by hand"]).status_code == 201
    blocked = chat(gateway.url, key)
    assert blocked.status_code == 403 and blocked.json()["error"]["code"] == "account_blocked"
    assert [r.policy_action for r in ledger_rows(gateway.db, "bob")] == [None, "blocked:block"]
    history = admin(gateway, "GET", "/admin/verdicts", params={"account": "bob"}).json()["data"]
    assert [(v["level"], v["source"]) for v in history] == [("blocked", "admin")]


def test_verdict_admin_api_rejects_bad_input(gateway):
    new_key(gateway, "victor")
    bad = set_level(gateway, "victor", "panic")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "level"
    assert (
        admin(
            gateway, "POST", "/admin/accounts/victor/verdict", json={"level": "ok", "x": 1}
        ).status_code
        == 400
    )
    key = new_key(gateway, "eve")
    denied = httpx.post(
        f"{gateway.url}/admin/accounts/eve/verdict",
        json={"level": "ok"},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert denied.status_code == 403


def test_watch_level_only_logs(gateway):
    key = new_key(gateway, "walter")
    before = chat(gateway.url, key, seed=5, logprobs=True, top_logprobs=2)
    set_level(gateway, "walter", "watch")
    after = chat(gateway.url, key, seed=5, logprobs=True, top_logprobs=2)
    assert after.status_code == 200
    assert (
        after.json()["choices"][0]["message"] == before.json()["choices"][0]["message"]
    )  # same answer
    assert [r.policy_action for r in ledger_rows(gateway.db, "walter")] == [None, "watch:log"]


def test_canaries_are_served_and_recorded(gateway):
    """A second server on the same ledger with a canary-only ladder: every answer to the
    extracting account is its canary, recomputable from the secret and the ledger row."""
    with serve_process(
        "--model",
        "tiny",
        "--db",
        gateway.db,
        "--policy",
        str(gateway.canary_policy),
        env=gateway.env,
    ) as url:
        key = new_key(SimpleNamespace(url=url), "carol")
        set_level(SimpleNamespace(url=url), "carol", "extracting")
        plain = chat(url, key, n=2)
        assert plain.status_code == 200
        body = plain.json()
        texts = [c["message"]["content"] for c in body["choices"]]
        assert len(texts) == 2 and texts[0] == texts[1]
        assert body["usage"]["completion_tokens"] >= 2 and body["usage"]["prompt_tokens"] >= 1
        streamed = httpx.post(
            f"{url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
            json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        )
        events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        stream_text = "".join(
            c["choices"][0]["delta"].get("content") or ""
            for c in map(json.loads, events[:-1])
            if c["choices"]
        )
    rows = ledger_rows(gateway.db, "carol")
    assert [r.policy_action for r in rows] == ["extracting:canary", "extracting:canary"]
    assert json.loads(rows[0].response_text) == texts
    assert texts[0] == canary_text(SECRET.encode(), "carol", rows[0].request_id)
    assert (
        stream_text
        == canary_text(SECRET.encode(), "carol", rows[1].request_id)
        == rows[1].response_text
    )
    assert rows[0].watermark_key_id is None  # no model output was served


# ---- the online monitor --------------------------------------------------------------------


class CountingMonitor:
    """A real (if simple) detector: an account is suspect after `after` requests with logprobs."""

    def __init__(self, after: int):
        self.after, self.counts = after, {}

    def observe(self, record: dict):
        if not record["request"].get("logprobs"):
            return None
        n = self.counts[record["account"]] = self.counts.get(record["account"], 0) + 1
        if n >= self.after:
            return SimpleNamespace(
                level="suspect", score=float(n), reasons=[f"{n} requests asked for logprobs"]
            )
        return None


def test_online_monitor_escalates_off_the_request_path(tmp_path):
    from distillguard.guard.gateway import Guard, GuardConfig, RequestLog
    from distillguard.guard.keys import KeyRecord

    async def scenario():
        guard = Guard(
            GuardConfig(
                db=f"sqlite:///{tmp_path / 'l.db'}", watermark=False, verdict_cache_ttl_s=0
            ),
            monitor=CountingMonitor(after=3),
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
        levels = []
        try:
            for i in range(5):
                log = RequestLog(client_ip="10.0.0.1", key=key)
                log.body = {
                    "model": "tiny",
                    "messages": [{"role": "user", "content": f"q{i}"}],
                    "logprobs": True,
                    "top_logprobs": 5,
                }
                await guard.recorder.finish(log)
                await asyncio.sleep(0.2)  # the monitor thread works behind the request
                levels.append(await guard.policing.level_of("acct"))
        finally:
            await guard.close()
        return levels, guard.policing.recent("acct"), guard.monitor.errors

    levels, verdicts, errors = asyncio.run(scenario())
    assert levels[:2] == [Level.OK, Level.OK] and levels[2:] == [Level.SUSPECT] * 3
    assert len(verdicts) == 1 and verdicts[0]["source"] == "online"  # only escalations are recorded
    assert verdicts[0]["reasons"] == ["3 requests asked for logprobs"] and errors == 0


class SayingMonitor:
    """A detector plugin that says the same level of every request."""

    def __init__(self, level: str):
        self.level = level

    def observe(self, record: dict):
        return SimpleNamespace(level=self.level, score=99.0, reasons=["certain of it"])


def test_online_detection_cannot_block(tmp_path):
    """A monitor that says "blocked" puts the account at 'extracting' (served, with canaries), once:
    only an admin blocks."""
    from distillguard.guard.gateway import Guard, GuardConfig, RequestLog
    from distillguard.guard.keys import KeyRecord

    async def scenario():
        guard = Guard(
            GuardConfig(
                db=f"sqlite:///{tmp_path / 'l.db'}", watermark=False, verdict_cache_ttl_s=0
            ),
            monitor=SayingMonitor("blocked"),
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
            for i in range(3):
                log = RequestLog(client_ip="10.0.0.1", key=key)
                log.body = {"model": "tiny", "messages": [{"role": "user", "content": f"q{i}"}]}
                await guard.recorder.finish(log)
            await asyncio.to_thread(guard.monitor.stop)  # drains the queue
            level = await guard.policing.level_of("acct")
            decision = await guard.policing.decide(key)
        finally:
            await guard.close()
        return level, decision, guard.policing.recent("acct"), guard.monitor.errors

    level, decision, verdicts, errors = asyncio.run(scenario())
    assert level is Level.EXTRACTING and not decision.block and "canary" in decision.actions
    assert [(v["level"], v["source"]) for v in verdicts] == [("extracting", "online")]
    assert verdicts[0]["reasons"][0].startswith("online verdict 'blocked' capped at 'extracting'")
    assert errors == 0
