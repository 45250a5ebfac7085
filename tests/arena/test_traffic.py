"""Evaluation traffic: the traffic-log contract, determinism, the pool split, benign behaviour,
and the CLI."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from collections import defaultdict

import pytest
from pydantic import ValidationError

from distillguard.arena import CampaignSpec, TrafficConfig, generate_traffic, load_pools
from distillguard.arena.pools import normalise, pool_of
from distillguard.arena.traffic import campaign_kinds
from distillguard.errors import ConfigError
from distillguard.guard.ledger import read_traffic
from distillguard.serve.schemas import ChatCompletionRequest

CAMPAIGNS = ("bulk:1:400",)
CONFIG = TrafficConfig(benign_accounts=60, campaigns=CAMPAIGNS, seed=7, days=3)


@pytest.fixture(scope="module")
def traffic() -> list[dict]:
    return generate_traffic(CONFIG)


def _by_account(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        out[r["account"]].append(r)
    return out


def test_records_follow_the_traffic_log_contract(traffic):
    lines = [json.dumps(r) for r in traffic]
    parsed = list(read_traffic(lines, source="generated"))  # the reader `detect --traffic` uses
    assert len(parsed) == len(traffic) > 1000
    kinds = set(campaign_kinds())
    for r in traffic:
        assert set(r) <= {"ts", "account", "ip", "request", "response", "label", "campaign"}
        req = ChatCompletionRequest.model_validate(r["request"])  # the gateway's own schema, strict
        req.check()
        usage = r["response"]["usage"]
        assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
        if r["label"] == "benign":
            assert "campaign" not in r
        else:
            assert r["label"] in kinds and r["campaign"].startswith(r["label"] + "-")
        assert CONFIG.start <= r["ts"] < CONFIG.end
    assert [r["ts"] for r in traffic] == sorted(r["ts"] for r in traffic)
    # account names carry no label
    assert all(r["account"].startswith("acct-") and "bulk" not in r["account"] for r in traffic)


def test_same_seed_same_traffic_other_seed_other_traffic(traffic):
    assert generate_traffic(CONFIG) == traffic
    other = generate_traffic(CONFIG.model_copy(update={"seed": 8}))
    assert [r["request"] for r in other[:50]] != [r["request"] for r in traffic[:50]]


def test_adding_a_campaign_leaves_the_benign_users_unchanged(traffic):
    alone = generate_traffic(CONFIG.model_copy(update={"campaigns": ()}))
    assert alone == [r for r in traffic if r["label"] == "benign"]


def test_pools_are_disjoint_by_id_and_by_text():
    pools = load_pools()
    ids = {name: {t.base_id for t in threads} for name, threads in pools.items()}
    assert not ids["calibration"] & ids["eval"] and not ids["calibration"] & ids["attack"]
    assert not ids["eval"] & ids["attack"]
    assert all(pool_of(t.id) == name for name, threads in pools.items() for t in threads)
    benign = {normalise(u) for name in ("calibration", "eval") for t in pools[name] for u in t.user_turns}
    attack = {normalise(u) for t in pools["attack"] for u in t.user_turns}
    assert not benign & attack
    firsts = {name: {normalise(t.turns[0]) for t in pools[name]} for name in ("calibration", "eval")}
    assert not firsts["calibration"] & firsts["eval"]
    # the split is not degenerate: every pool holds thousands of conversations
    assert all(len(threads) > 3000 for threads in pools.values())


def test_benign_users_draw_only_on_their_pool_and_attackers_only_on_the_attack_pool(traffic):
    pools = load_pools()
    text_pool = {}
    for name, threads in pools.items():
        for t in threads:
            for u in t.user_turns:
                text_pool.setdefault(normalise(u), set()).add(name)
    calibration = generate_traffic(TrafficConfig(benign_accounts=60, seed=7, pool="calibration"))
    for records, want in ((traffic, "eval"), (calibration, "calibration")):
        for r in records:
            if r["label"] == "benign":
                last = r["request"]["messages"][-1]["content"]
                assert want in text_pool[normalise(last)]
    for r in traffic:
        if r["label"] == "bulk":
            seen = text_pool.get(normalise(r["request"]["messages"][-1]["content"]), {"attack"})
            assert seen == {"attack"}  # reworded repeats are in no pool at all


def test_benign_users_hold_multi_turn_conversations_with_human_gaps(traffic):
    accounts = _by_account([r for r in traffic if r["label"] == "benign"])
    assert len(accounts) == 60  # every user shows up at least once
    multi = [r for r in traffic if r["label"] == "benign"
             if sum(m["role"] == "assistant" for m in r["request"]["messages"]) >= 1]
    assert len(multi) > 0.4 * sum(r["label"] == "benign" for r in traffic)
    for r in multi[:200]:  # follow-ups carry the conversation: roles alternate, last is the user
        roles = [m["role"] for m in r["request"]["messages"] if m["role"] != "system"]
        assert roles[-1] == "user" and all(a != b for a, b in zip(roles, roles[1:]))
    gaps = [b["ts"] - a["ts"] for recs in accounts.values() for a, b in zip(recs, recs[1:])]
    assert statistics.median(gaps) > 20  # people read and type between turns
    assert min(gaps) > 0.5
    per_day = [len({int((r["ts"] - CONFIG.start) // 86400) for r in recs}) for recs in accounts.values()]
    assert sum(d < 3 for d in per_day) > 0.3 * len(per_day)  # idle days are common
    counts = sorted(len(recs) for recs in accounts.values())
    assert counts[-1] > 8 * statistics.median(counts)  # a few heavy users


def test_benign_users_resemble_attackers_in_one_respect_at_most(traffic):
    accounts = _by_account([r for r in traffic if r["label"] == "benign"])
    researchers = {a for a, recs in accounts.items() if any(r["request"].get("logprobs") for r in recs)}
    long_out = {a for a, recs in accounts.items() if any(r["request"].get("max_tokens", 0) >= 4096 for r in recs)}
    multi_n = {a for a, recs in accounts.items() if any(r["request"].get("n", 1) > 1 for r in recs)}
    assert researchers and long_out and multi_n
    assert not researchers & long_out and not researchers & multi_n and not long_out & multi_n
    ips = defaultdict(set)
    for a, recs in accounts.items():
        ips[recs[0]["ip"]].add(a)
    assert any(len(v) > 1 for v in ips.values())  # an office NAT
    systems = defaultdict(set)
    for a, recs in accounts.items():
        for r in recs:
            m = r["request"]["messages"][0]
            if m["role"] == "system":
                systems[m["content"]].add(a)
    assert systems


def test_bulk_is_one_fast_single_turn_account(traffic):
    bulk = [r for r in traffic if r["label"] == "bulk"]
    assert len(bulk) == 400 and len({r["account"] for r in bulk}) == 1
    assert all(len(r["request"]["messages"]) == 1 for r in bulk)
    span_min = (bulk[-1]["ts"] - bulk[0]["ts"]) / 60
    assert len(bulk) / span_min > 20  # well over a human's rate


@pytest.mark.parametrize("text, message", [
    ("nosuch", "unknown campaign kind 'nosuch'"),
    ("bulk:0", "ACCOUNTS must be a positive integer"),
    ("bulk:x", "ACCOUNTS must be a positive integer"),
    ("hydra:2:3:4", "expected KIND[:ACCOUNTS[:REQUESTS]]"),
])
def test_bad_campaign_specs_name_the_problem(text, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        CampaignSpec.parse(text)


def test_config_validates_with_clear_messages():
    with pytest.raises(ValidationError, match="nothing to generate"):
        TrafficConfig(benign_accounts=0)
    with pytest.raises(ValidationError, match="unknown campaign kind"):
        TrafficConfig(campaigns=[{"kind": "nosuch"}])
    with pytest.raises(ValidationError, match="days"):
        TrafficConfig(days=0)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distillguard.cli", "arena", "traffic", *args],
                          capture_output=True, text=True, timeout=300)


def test_cli_writes_a_traffic_file(tmp_path):
    out = tmp_path / "t.jsonl"
    proc = _cli("--benign-accounts", "5", "--campaign", "bulk:1:30", "--seed", "3", "--days", "1", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sum(r["label"] == "bulk" for r in records) == 30
    assert len({r["account"] for r in records if r["label"] == "benign"}) == 5
    assert records == generate_traffic(TrafficConfig(benign_accounts=5, campaigns=["bulk:1:30"], seed=3, days=1))


def test_cli_rejects_a_bad_campaign_in_one_line(tmp_path):
    proc = _cli("--campaign", "bulkk", "-o", str(tmp_path / "t.jsonl"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown campaign kind 'bulkk'" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "t.jsonl").exists()
