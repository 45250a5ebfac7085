"""Evaluation traffic: the traffic-log contract, determinism, the pool split, benign behaviour,
and the CLI."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
from collections import defaultdict

import pytest
from pydantic import ValidationError

from distillguard.arena import CampaignSpec, TrafficConfig, benign, generate_traffic, load_pools
from distillguard.arena.pools import normalise, pool_of
from distillguard.arena.traffic import campaign_kinds
from distillguard.errors import ConfigError
from distillguard.guard.ledger import read_traffic
from distillguard.serve.process import distillguard_command
from distillguard.serve.schemas import ChatCompletionRequest

CAMPAIGNS = (
    "bulk:1:400",
    "template:1:300",
    "reasoning:1:300",
    "logprobs:1:300",
    "hydra:8:60",
    "slowlow:1:90",
)
RPM = 4  # low, so that hydra's spacing has to hold it back
CONFIG = TrafficConfig(benign_accounts=60, campaigns=CAMPAIGNS, seed=7, days=3, rpm_limit=RPM)


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
    benign = {
        normalise(u) for name in ("calibration", "eval") for t in pools[name] for u in t.user_turns
    }
    attack = {normalise(u) for t in pools["attack"] for u in t.user_turns}
    assert not benign & attack
    firsts = {
        name: {normalise(t.turns[0]) for t in pools[name]} for name in ("calibration", "eval")
    }
    assert not firsts["calibration"] & firsts["eval"]
    # the split is not degenerate: every pool holds thousands of conversations (parts counted apart)
    assert all(len(threads) > 3000 for threads in pools.values())
    # ... and thousands of whole ones, 10,000+ user turns each
    assert all(
        len(threads) > 2000 and sum(len(t.user_turns) for t in threads) > 10_000
        for threads in load_pools(whole=True).values()
    )


def test_whole_conversations_traffic_keeps_the_contract_and_carries_history():
    """With ``whole_conversations`` benign users replay ShareGPT's long conversations whole: more of
    their requests are follow-ups with history than when each part opens a conversation."""

    def follow_up_share(whole: bool) -> float:
        recs = generate_traffic(
            TrafficConfig(benign_accounts=40, seed=5, whole_conversations=whole)
        )
        assert recs and all(ChatCompletionRequest.model_validate(r["request"]) for r in recs)
        return sum(
            any(m["role"] == "assistant" for m in r["request"]["messages"]) for r in recs
        ) / len(recs)

    assert follow_up_share(True) > follow_up_share(False)


def test_parts_of_a_long_conversation_are_one_thread_with_its_history():
    """ShareGPT's ``abc_1`` continues ``abc_0``: its user turns are follow-ups, so the benign
    user who asks them must send the earlier turns as history, not open a new conversation."""
    from distillguard.data.sharegpt import iter_conversations

    threads = {
        t.base_id: t for name in ("calibration", "eval") for t in load_pools(whole=True)[name]
    }
    checked, asked_in_part_0 = 0, set()
    for conv in iter_conversations():
        base, _, part = conv.id.rpartition("_")
        first_user = next(
            (text for role, text in conv.turns if role == "user" and text.strip()), None
        )
        if part == "0" and first_user is not None:
            asked_in_part_0.add(base)
        if part != "1" or base not in threads or base not in asked_in_part_0 or first_user is None:
            continue
        thread = threads[base]
        users = [normalise(u) for u in thread.user_turns]
        if normalise(first_user[:6000]) not in users:
            continue  # the thread ends before this part (an empty turn cut it)
        k = users.index(normalise(first_user[:6000]))
        assert k > 0  # a follow-up, not the opening of a conversation
        history = benign.conversation_messages(None, thread, k)
        assert (
            len(history) == 2 * k + 1
            or sum(len(m["content"]) for m in history) > benign.HISTORY_CHARS / 2
        )
        assert history[-1]["content"] == thread.user_turns[k]
        checked += 1
        if checked == 50:
            break
    assert checked == 50


def test_benign_users_draw_only_on_their_pool_and_attackers_only_on_the_attack_pool(traffic):
    pools = load_pools()
    text_pool = {}
    for name, threads in pools.items():
        for t in threads:
            for u in t.user_turns:
                text_pool.setdefault(normalise(u), set()).add(name)
    calibration = generate_traffic(TrafficConfig(benign_accounts=60, seed=7, pool="calibration"))
    # the two files never share an account name, even with the same seed
    assert not {r["account"] for r in calibration} & {r["account"] for r in traffic}
    for records, want in ((traffic, "eval"), (calibration, "calibration")):
        for r in records:
            if r["label"] == "benign":
                last = r["request"]["messages"][-1]["content"]
                assert want in text_pool[normalise(last)]
    for r in traffic:
        if r["label"] != "benign":
            for m in r["request"]["messages"]:
                if m["role"] == "user":
                    # templated and reworded prompts are in no pool at all
                    assert text_pool.get(normalise(m["content"]), {"attack"}) == {"attack"}


def test_benign_users_hold_multi_turn_conversations_with_human_gaps(traffic):
    accounts = _by_account([r for r in traffic if r["label"] == "benign"])
    assert len(accounts) == 60  # every user shows up at least once
    multi = [
        r
        for r in traffic
        if r["label"] == "benign"
        if sum(m["role"] == "assistant" for m in r["request"]["messages"]) >= 1
    ]
    assert len(multi) > 0.4 * sum(r["label"] == "benign" for r in traffic)
    for r in multi[:200]:  # follow-ups carry the conversation: roles alternate, last is the user
        roles = [m["role"] for m in r["request"]["messages"] if m["role"] != "system"]
        assert roles[-1] == "user" and all(a != b for a, b in zip(roles, roles[1:]))
    gaps = [b["ts"] - a["ts"] for recs in accounts.values() for a, b in zip(recs, recs[1:])]
    assert statistics.median(gaps) > 20  # people read and type between turns
    assert min(gaps) > 0.5
    per_day = [
        len({int((r["ts"] - CONFIG.start) // 86400) for r in recs}) for recs in accounts.values()
    ]
    assert sum(d < 3 for d in per_day) > 0.3 * len(per_day)  # idle days are common
    counts = sorted(len(recs) for recs in accounts.values())
    assert counts[-1] > 8 * statistics.median(counts)  # a few heavy users


def test_benign_users_return_to_a_few_subjects_over_days(traffic):
    """Users come back to their own subjects (FOCUS_SHARE of conversations), not to everything
    under a broad topic: a user's two most frequent subjects hold most of their conversations,
    while a topic sweep (slowlow) spreads over many."""
    from distillguard.arena.pools import focus_of, topic_of

    def subjects(recs):
        firsts = [
            r["request"]["messages"][-1]["content"]
            for r in recs
            if not any(m["role"] == "assistant" for m in r["request"]["messages"])
        ]
        return [(topic_of(p), focus_of(p, topic_of(p))) for p in firsts]

    accounts = _by_account(traffic)
    shares = []
    for recs in accounts.values():
        if recs[0]["label"] != "benign":
            continue
        subj = [s for s in subjects(recs) if s[1] is not None]
        if len(subj) >= 8:
            top2 = sum(sorted((subj.count(x) for x in set(subj)), reverse=True)[:2])
            shares.append(top2 / len(subj))
    assert len(shares) >= 5
    assert statistics.median(shares) >= 0.5
    sweep = [
        s
        for recs in accounts.values()
        if recs[0]["label"] == "slowlow"
        for s in subjects(recs)
        if s[1]
    ]
    top2 = sum(sorted((sweep.count(x) for x in set(sweep)), reverse=True)[:2]) / len(sweep)
    assert top2 < statistics.median(shares) - 0.2


def test_benign_users_resemble_attackers_in_one_respect_at_most(traffic):
    accounts = _by_account([r for r in traffic if r["label"] == "benign"])
    researchers = {
        a for a, recs in accounts.items() if any(r["request"].get("logprobs") for r in recs)
    }
    long_out = {
        a
        for a, recs in accounts.items()
        if any(r["request"].get("max_tokens", 0) >= 4096 for r in recs)
    }
    multi_n = {a for a, recs in accounts.items() if any(r["request"].get("n", 1) > 1 for r in recs)}
    one_shot = {
        a
        for a, recs in accounts.items()
        if len(recs) >= 5
        and not any(m["role"] == "assistant" for r in recs for m in r["request"]["messages"])
    }
    groups = [researchers, long_out, multi_n, one_shot]
    assert all(groups)
    assert all(not a & b for i, a in enumerate(groups) for b in groups[i + 1 :])
    ips = defaultdict(set)
    for a, recs in accounts.items():
        for r in recs:
            ips[r["ip"]].add(a)
    assert any(len(v) > 1 for v in ips.values())  # an office NAT
    per_user = [len({r["ip"] for r in recs}) for recs in accounts.values()]
    assert max(per_user) <= 3 and sum(n > 1 for n in per_user) > 0.2 * len(
        per_user
    )  # home, work, phone
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


@pytest.mark.parametrize(
    "text, message",
    [
        ("nosuch", "unknown campaign kind 'nosuch'"),
        ("bulk:0", "ACCOUNTS must be a positive integer"),
        ("bulk:x", "ACCOUNTS must be a positive integer"),
        ("hydra:2:3:4", "expected KIND[:ACCOUNTS[:REQUESTS]]"),
    ],
)
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
    # rich wraps stderr at 80 columns when it is not a terminal; a wide one shows the real lines
    env = {**os.environ, "COLUMNS": "300"}
    return subprocess.run(
        distillguard_command("arena", "traffic", *args),
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_cli_writes_a_traffic_file(tmp_path):
    out = tmp_path / "t.jsonl"
    proc = _cli(
        "--benign-accounts",
        "5",
        "--campaign",
        "bulk:1:30",
        "--seed",
        "3",
        "--days",
        "1",
        "-o",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sum(r["label"] == "bulk" for r in records) == 30
    assert len({r["account"] for r in records if r["label"] == "benign"}) == 5
    assert records == generate_traffic(
        TrafficConfig(benign_accounts=5, campaigns=["bulk:1:30"], seed=3, days=1)
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (("--campaign", "bulkk"), "unknown campaign kind 'bulkk'"),
        (("--days", "0"), "--days: Input should be greater than 0"),
    ],
)
def test_cli_rejects_bad_options_in_one_line(tmp_path, args, message):
    proc = _cli(*args, "-o", str(tmp_path / "t.jsonl"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "t.jsonl").exists()


def _label(traffic, label):
    return [r for r in traffic if r["label"] == label]


def _user_text(r) -> str:
    return "\n".join(
        m["content"] for m in r["request"]["messages"] if m["role"] in ("user", "system")
    )


def test_hydra_accounts_share_an_actor_and_each_stays_under_the_rpm_limit(traffic):
    hydra = _by_account(_label(traffic, "hydra"))
    assert len(hydra) == 8 and all(0.6 * 60 <= len(recs) <= 1.4 * 60 for recs in hydra.values())
    assert len({len(recs) for recs in hydra.values()}) > 1  # keys differ in volume
    assert len({r["campaign"] for recs in hydra.values() for r in recs}) == 1
    for recs in hydra.values():
        ts = [r["ts"] for r in recs]
        # the limiter's rule: no 60 s interval holds more than rpm requests
        assert max(sum(1 for u in ts[i:] if u - t < 60.0) for i, t in enumerate(ts)) <= RPM
    prefixes = {r["ip"].rsplit(".", 1)[0] for recs in hydra.values() for r in recs}
    assert len(prefixes) <= 3  # proxy ranges shared by all keys
    systems = {
        r["request"]["messages"][0]["content"]
        for recs in hydra.values()
        for r in recs
        if r["request"]["messages"][0]["role"] == "system"
    }
    assert len(systems) == 1  # one template system prompt
    for recs in hydra.values():  # each key mixes benign-looking conversations into the extraction
        follow_ups = sum(
            any(m["role"] == "assistant" for m in r["request"]["messages"]) for r in recs
        )
        templated = sum(r["request"]["messages"][0]["role"] == "system" for r in recs)
        assert follow_ups > 0 and 0.35 < templated / len(recs) < 0.65  # decoy_share 0.5
    # the scheduler starts every key's sessions within minutes of each other
    firsts = sorted(recs[0]["ts"] for recs in hydra.values())
    assert firsts[-1] - firsts[0] < 15 * 60


def test_hydra_decoy_share_sets_how_much_of_each_key_looks_benign():
    recs = generate_traffic(
        TrafficConfig(benign_accounts=0, campaigns=["hydra:4:100"], decoy_share=0.9)
    )
    for account_recs in _by_account(recs).values():
        templated = sum(r["request"]["messages"][0]["role"] == "system" for r in account_recs)
        assert 0.05 <= templated / len(account_recs) <= 0.15


def test_logprobs_campaign_harvests_top_20_greedy_over_all_topics(traffic):
    recs = _label(traffic, "logprobs")
    assert len(recs) == 300
    for r in recs:
        req = r["request"]
        assert req["logprobs"] is True and req["top_logprobs"] == 20 and req["temperature"] == 0.0
    from distillguard.arena import topic_of

    campaign_topics = {topic_of(_user_text(r)) for r in recs[:120]}
    benign = _by_account(_label(traffic, "benign"))
    busiest = max(benign.values(), key=len)
    user_topics = {topic_of(r["request"]["messages"][-1]["content"]) for r in busiest[:120]}
    assert len(campaign_topics) >= 12 and len(campaign_topics) > len(user_topics)


def test_reasoning_campaign_asks_for_the_reasoning_every_time(traffic):
    recs = _label(traffic, "reasoning")
    cues = ("step by step", "reasoning", "<think>")
    assert all(any(c in _user_text(r).lower() for c in cues) for r in recs)
    assert all(r["request"]["max_tokens"] >= 4096 for r in recs)
    usage = statistics.median(r["response"]["usage"]["completion_tokens"] for r in recs)
    assert usage > 2 * statistics.median(
        r["response"]["usage"]["completion_tokens"] for r in _label(traffic, "benign")
    )


def test_template_campaign_is_templated(traffic):
    import re

    from distillguard.arena.campaigns import TEMPLATES

    patterns = [
        re.compile(
            re.escape(t)
            .replace(r"\{genre\}", ".+")
            .replace(r"\{subject\}", ".+")
            .replace(r"\{subject2\}", ".+")
            .replace(r"\{k\}", r"\d+")
            .replace(r"\{audience\}", ".+")
            .replace(r"\{author\}", ".+")
        )
        for t in TEMPLATES
    ]
    recs = _label(traffic, "template")
    kinds = {"template": 0, "evol": 0, "self-instruct": 0}
    for r in recs:
        text = r["request"]["messages"][-1]["content"]
        if any(p.fullmatch(text) for p in patterns):
            kinds["template"] += 1
        elif "#Given Prompt#" in text or "#The Given Prompt#" in text:
            kinds["evol"] += 1
        elif text.startswith("Come up with a series of tasks"):
            kinds["self-instruct"] += 1
    assert sum(kinds.values()) == len(recs) and all(kinds.values())
    assert len({r["request"]["messages"][-1]["content"] for r in recs}) > 0.9 * len(
        recs
    )  # a sweep, not a loop


def test_slowlow_is_human_paced_single_turn_and_sweeps_topics(traffic):
    from distillguard.arena import topic_of

    recs = _label(traffic, "slowlow")
    assert len(recs) == 90 and len({r["account"] for r in recs}) == 1
    assert all(len(r["request"]["messages"]) == 1 for r in recs)  # never a follow-up
    days = {int((r["ts"] - CONFIG.start) // 86400) for r in recs}
    assert days == {0, 1, 2}  # every day, a little
    gaps = [b["ts"] - a["ts"] for a, b in zip(recs, recs[1:])]
    assert statistics.median(gaps) > 20
    assert len({topic_of(_user_text(r)) for r in recs}) >= 12


def test_a_plugin_campaign_registers_like_the_builtins():
    from distillguard.arena import Call, register_campaign
    from distillguard.arena.base import CAMPAIGNS

    @register_campaign("echo-test", default_accounts=2, default_requests=3)
    def echo(ctx):
        for j, account in enumerate(ctx.accounts):
            for r in range(ctx.requests_per_account):
                yield Call(
                    ctx.start + 60 * r + j,
                    account,
                    "10.0.0.1",
                    ctx.request([{"role": "user", "content": f"echo {r}"}]),
                    5,
                )

    try:
        recs = generate_traffic(
            TrafficConfig(benign_accounts=0, campaigns=["echo-test", "echo-test:1:2"])
        )
        assert [r["label"] for r in recs] == ["echo-test"] * 8
        assert {r["campaign"] for r in recs} == {"echo-test-1", "echo-test-2"}
        assert len({r["account"] for r in recs}) == 3
    finally:
        CAMPAIGNS.remove("echo-test")


def test_traffic_loads_into_the_ledger_and_exports_unchanged(tmp_path):
    """What the gateway's ledger holds is what detection reads online: generated traffic goes
    through `ledger import` and comes back out of `ledger export` with the same requests."""
    import io

    from distillguard.guard.db import make_engine, migrate
    from distillguard.guard.ledger import export_traffic, import_traffic

    records = generate_traffic(
        TrafficConfig(benign_accounts=5, campaigns=["hydra:3:20"], seed=1, days=1)
    )
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        migrate(engine)
        assert import_traffic(engine, [json.dumps(r) + "\n" for r in records]) == len(records)
        out = io.StringIO()
        export_traffic(engine, out)
    finally:
        engine.dispose()
    back = [json.loads(line) for line in out.getvalue().splitlines()]

    def key(r):
        return r["account"], r["ts"], r["label"], r["ip"], json.dumps(r["request"], sort_keys=True)

    assert sorted(map(key, back)) == sorted(map(key, records))
    usage = [r["response"]["usage"] for r in sorted(back, key=key)]
    assert usage == [r["response"]["usage"] for r in sorted(records, key=key)]


def test_plot_draws_the_traffic(traffic, tmp_path):
    pytest.importorskip("matplotlib")
    from distillguard.arena.plot import plot_traffic

    out = plot_traffic(traffic, tmp_path / "traffic.png", title="test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    with pytest.raises(ConfigError, match="no traffic"):
        plot_traffic([], tmp_path / "empty.png")


def _auc(pos: list[float], neg: list[float]) -> float:
    """P(a positive scores above a negative), ties counted half (the Mann-Whitney statistic)."""
    return sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg) / (
        len(pos) * len(neg)
    )


def test_no_single_account_feature_gives_hydra_keys_away(traffic):
    """Each hydra key should look mostly normal: none of the obvious per-account features
    separates the keys from benign users on its own (linking them is the detector's job)."""
    accounts = _by_account(traffic)

    def features(recs):
        reqs = [r["request"] for r in recs]
        gaps = [b["ts"] - a["ts"] for a, b in zip(recs, recs[1:])] or [1e9]
        return {
            "requests": len(recs),
            "follow-up share": sum(
                any(m["role"] == "assistant" for m in q["messages"]) for q in reqs
            )
            / len(reqs),
            "system-prompt share": sum(q["messages"][0]["role"] == "system" for q in reqs)
            / len(reqs),
            "median gap": statistics.median(gaps),
            "addresses": len({r["ip"] for r in recs}),
            "max_tokens": statistics.median(q.get("max_tokens", 0) for q in reqs),
        }

    feats = {a: features(recs) for a, recs in accounts.items()}
    hydra = [a for a, recs in accounts.items() if recs[0]["label"] == "hydra"]
    benign = [a for a, recs in accounts.items() if recs[0]["label"] == "benign"]
    for name in feats[hydra[0]]:
        auc = _auc([feats[a][name] for a in hydra], [feats[a][name] for a in benign])
        assert 0.02 < auc < 0.98, (
            f"{name} alone separates hydra keys from benign users (AUC {auc:.3f})"
        )


def test_popular_public_prompts_are_sent_by_many_users_and_by_the_sweeps():
    """With ``popular_prompts`` benign users open some conversations with prompts of a public set,
    Zipf-popular (the head sent by many accounts, never twice by one), the same set the sweeping
    campaigns draw on; ``apps`` users share their app's system prompt. Off by default: unchanged."""
    from collections import Counter

    from distillguard.arena.pools import public_prompts

    base = TrafficConfig(benign_accounts=120, seed=5, days=2, campaigns=["bulk:1:2000"])
    assert generate_traffic(base.model_copy(update={"campaigns": ()})) == [
        r for r in generate_traffic(base) if r["label"] == "benign"
    ]
    recs = generate_traffic(
        base.model_copy(
            update={"popular_prompts": 300, "popular_share": 0.3, "app_share": 0.1, "apps": 5}
        )
    )
    public = {text for text, _ in public_prompts(300)}
    by_prompt: dict[str, list[str]] = defaultdict(list)
    for r in recs:
        text = r["request"]["messages"][-1]["content"]
        if r["label"] == "benign" and text in public:
            by_prompt[text].append(r["account"])
    senders = sorted((len(set(a)) for a in by_prompt.values()), reverse=True)
    assert senders[0] >= 10 and senders[-1] == 1  # a popular head, a long tail
    assert all(len(a) == len(set(a)) for a in by_prompt.values())  # never twice by one user
    swept = {r["request"]["messages"][-1]["content"] for r in recs if r["label"] == "bulk"}
    assert len(swept & set(by_prompt)) >= 10  # the sweep meets the users
    apps = Counter(
        r["request"]["messages"][0]["content"]
        for r in recs
        if r["label"] == "benign" and r["request"]["messages"][0]["role"] == "system"
    )
    app_users = defaultdict(set)
    for r in recs:
        m = r["request"]["messages"][0]
        if (
            r["label"] == "benign"
            and m["role"] == "system"
            and ("App0" in m["content"] or "HelpDesk" in m["content"])
        ):
            app_users[m["content"]].add(r["account"])
    assert apps and sum(len(v) for v in app_users.values()) >= 4


def test_large_nats_put_many_users_in_one_network_and_change_nothing_when_off():
    base = TrafficConfig(benign_accounts=80, seed=6, days=1)
    assert generate_traffic(base.model_copy(update={"nat_share": 0.0})) == generate_traffic(base)
    recs = generate_traffic(base.model_copy(update={"nat_share": 0.5, "nat_size": 30}))
    nets = defaultdict(set)
    for r in recs:
        nets[r["ip"].rsplit(".", 1)[0]].add(r["account"])
    sizes = sorted((len(v) for v in nets.values()), reverse=True)
    assert sizes[0] >= 15 and sizes[0] <= 30 and sizes[1] >= 10  # NATs of up to 30 users each
