"""The adaptive campaign stays under every single-account signal it claims to (arena/adaptive.py):
a heavy human's daily volume, daytime hours, follow-up turns, no shared system prompt or /24,
no conversation shared by two of its accounts while the pool lasts."""

from __future__ import annotations

from collections import defaultdict

import pytest

from distillguard.arena import TrafficConfig, generate_traffic
from distillguard.arena.adaptive import distinct_subnet_ips
from distillguard.arena.traffic import campaign_kinds
from distillguard.serve.schemas import ChatCompletionRequest

DAYS = 2


@pytest.fixture(scope="module")
def traffic() -> list[dict]:
    return generate_traffic(
        TrafficConfig(benign_accounts=300, campaigns=("adaptive:25:60",), seed=5, days=DAYS)
    )


def _by_account(records, label):
    out = defaultdict(list)
    for r in records:
        if r["label"] == label:
            out[r["account"]].append(r)
    return out


def _last_user_turn(r) -> str:
    return [m for m in r["request"]["messages"] if m["role"] == "user"][-1]["content"]


def test_adaptive_is_a_registered_campaign_kind():
    kind = campaign_kinds()["adaptive"]
    assert kind.default_accounts == 50 and "adaptive" in kind.description


def test_each_account_stays_under_a_heavy_humans_signals(traffic):
    camp = _by_account(traffic, "adaptive")
    benign = _by_account(traffic, "benign")
    assert len(camp) == 25
    heaviest_day = max(
        sum(int((r["ts"] - traffic[0]["ts"]) // 86400) == d for r in rs)
        for rs in benign.values()
        for d in range(DAYS)
    )
    for rs in camp.values():
        assert 50 <= len(rs) <= 60  # the window may cut the last session
        per_day = [sum(int((r["ts"] - rs[0]["ts"]) // 86400) == d for r in rs) for d in (0, 1)]
        assert max(per_day) <= heaviest_day  # no day busier than the busiest benign user's
        gaps = sorted(b["ts"] - a["ts"] for a, b in zip(rs, rs[1:]))
        assert gaps[len(gaps) // 2] > 20  # a person's pace: a median gap of tens of seconds
        assert all(m["role"] != "system" for r in rs for m in r["request"]["messages"])
        assert not any(r["request"].get("logprobs") or r["request"].get("n") for r in rs)
        for r in rs:
            ChatCompletionRequest.model_validate(r["request"])
    follow_ups = sum(len(r["request"]["messages"]) > 1 for rs in camp.values() for r in rs)
    assert follow_ups / sum(map(len, camp.values())) > 0.3  # multi-turn conversations


def test_accounts_share_no_subnet_and_no_conversation_while_the_pool_lasts(traffic):
    camp = _by_account(traffic, "adaptive")
    subnets = {a: {r["ip"].rsplit(".", 1)[0] for r in rs} for a, rs in camp.items()}
    assert all(len(s) == 1 for s in subnets.values())  # one residential exit per account
    assert len(set().union(*subnets.values())) == 25  # 25 distinct /24s
    senders = defaultdict(set)
    for a, rs in camp.items():
        for r in rs:
            senders[_last_user_turn(r)].add(a)
    # 25 x 60 requests fit the pool: at most a stray repeat of a generic turn ("continue")
    assert sum(len(s) > 1 for s in senders.values()) <= 3


def test_a_campaign_larger_than_the_pool_repeats_conversations_across_its_accounts():
    big = generate_traffic(
        TrafficConfig(benign_accounts=0, campaigns=("adaptive:200:100",), seed=6, days=DAYS)
    )
    senders = defaultdict(set)
    for r in big:
        senders[_last_user_turn(r)].add(r["account"])
    shared = sum(len(senders[_last_user_turn(r)]) > 1 for r in big)
    assert shared > 0.2 * len(big)  # 20,000 requests over ~11,500 turns: the actor repeats


def test_distinct_subnets_are_distinct():
    import random

    ips = distinct_subnet_ips(random.Random(1), 500)
    assert len({ip.rsplit(".", 1)[0] for ip in ips}) == 500
