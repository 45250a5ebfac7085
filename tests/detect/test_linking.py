"""Linking as weighed evidence (issue 23): a shared item counts by how rare it is, a pair's link is
a significance against chance overlap, communities resist chaining through a hub, and a cluster's
pooled behaviour reaches a member only in proportion to its own link evidence."""

from __future__ import annotations

import math
import random
from collections import Counter
from functools import lru_cache

import numpy as np
import pytest

from distillguard.arena import TrafficConfig, generate_traffic, load_pools
from distillguard.detect import DetectConfig, calibrate, detect
from distillguard.detect.linking import (
    attributed_share,
    communities,
    fisher_evidence,
    kind_evidence,
    poisson_evidence,
)

NO_EMBEDDINGS = ("volume", "timing", "shape", "template", "cot", "fresh", "linking")
DAY = 86_400.0


@lru_cache(maxsize=1)
def public_prompts() -> tuple[str, ...]:
    """A public prompt set (first turns of the attack pool, 8-60 words), most popular first."""
    out = []
    for t in load_pools()["attack"]:
        words = t.turns[0].split()
        if 8 <= len(words) <= 60 and t.turns[0] not in out:
            out.append(t.turns[0])
        if len(out) == 300:
            break
    return tuple(out)


def _is_first_turn(r: dict) -> bool:
    return not any(m["role"] == "assistant" for m in r["request"]["messages"])


def with_public_prompts(
    records: list[dict], users: list[str], seed: int, share: float = 0.8
) -> list[dict]:
    """``users`` open about ``share`` of their conversations with a public prompt, drawn Zipf-popular
    (rank r with weight 1/r): popular ones are sent by many of them, the tail by one or two."""
    rng = random.Random(seed)
    public = public_prompts()
    weights = [1.0 / (r + 1) for r in range(len(public))]
    sent: dict[str, set[str]] = {u: set() for u in users}  # a person does not send one prompt twice
    out = []
    for r in records:
        if r["account"] in sent and _is_first_turn(r) and rng.random() < share:
            text = rng.choices(public, weights)[0]
            if text not in sent[r["account"]]:
                sent[r["account"]].add(text)
                r = {
                    **r,
                    "request": {
                        **r["request"],
                        "messages": [
                            *r["request"]["messages"][:-1],
                            {"role": "user", "content": text},
                        ],
                    },
                }
        out.append(r)
    return out


def sweeper(start: float, name: str = "acct-sweeper") -> list[dict]:
    """A logprob harvest over the whole public set: greedy, top-20 logprobs, one request every ~2 s."""
    rng = random.Random(11)
    t, out = start + 9 * 3600.0, []
    for text in public_prompts():
        out.append(
            {
                "ts": t,
                "account": name,
                "ip": "203.0.113.7",
                "label": "logprobs",
                "request": {
                    "model": "smollm2",
                    "messages": [{"role": "user", "content": text}],
                    "temperature": 0.0,
                    "max_tokens": 512,
                    "logprobs": True,
                    "top_logprobs": 20,
                },
                "response": {"usage": {"prompt_tokens": 40, "completion_tokens": 400}},
            }
        )
        t += rng.uniform(1.5, 2.5)
    return out


def _benign(pool: str, accounts: int, seed: int, campaigns=()) -> tuple[list[dict], list[str]]:
    records = generate_traffic(
        TrafficConfig(benign_accounts=accounts, seed=seed, days=2, pool=pool, campaigns=campaigns)
    )
    opened = Counter(r["account"] for r in records if _is_first_turn(r) and r["label"] == "benign")
    users = random.Random(seed).sample(sorted(a for a, n in opened.items() if n >= 5), 50)
    return with_public_prompts(records, users, seed), users


@pytest.fixture(scope="module")
def sweep_report():
    cal_records, _ = _benign("calibration", 240, seed=21)
    cal = calibrate(cal_records, config=DetectConfig(target_fpr=0.001, detectors=NO_EMBEDDINGS))
    records, users = _benign(
        "eval", 160, seed=22, campaigns=["hydra:8:60"]
    )  # (benign users unchanged by it)
    report = detect(records + sweeper(min(r["ts"] for r in records)), cal)
    public = set(public_prompts())
    shared = Counter(
        r["account"] for r in records if r["request"]["messages"][-1]["content"] in public
    )
    return report, users, shared


def test_a_sweeper_over_prompts_50_benign_users_also_send_flags_none_of_them(sweep_report):
    report, users, shared = sweep_report
    rows = {r.account: r for r in report["results"]}
    # the case is real: most of the 50 send the sweeper 3+ of its prompts (enough to link them before)
    counts = sorted(shared[u] for u in users)
    assert counts[0] >= 1 and sum(c >= 3 for c in counts) >= 25, counts
    flagged = [u for u in users if rows[u].flagged]
    assert flagged == [], [(u, rows[u].score, rows[u].reasons) for u in flagged]
    assert rows["acct-sweeper"].flagged


def test_a_hydra_campaign_among_them_is_still_one_actor_with_reasons_that_weigh_its_links(
    sweep_report,
):
    report, _, _ = sweep_report
    hydra = [r for r in report["results"] if r.label == "hydra"]
    assert len(hydra) == 8 and sum(r.flagged for r in hydra) >= 7
    # its keys' communities (at most one per proxy /24 it uses) hold no one else
    clusters = {r.cluster for r in hydra} - {None}
    assert 1 <= len(clusters) <= 3
    assert not [
        r.account for r in report["results"] if r.label != "hydra" and r.cluster in clusters
    ]
    key = next(r for r in hydra if r.flagged and r.cluster is not None)
    linking = next(x for x in key.reasons if x.startswith("linking: own link evidence"))
    assert " w=" in linking and "10^-" in linking  # each link with its weight, each kind with its p
    assert any(x.startswith(f"cluster {key.cluster} of ") and "counts" in x for x in key.reasons)


# ---- the statistics on tiny inputs with known answers ----


def test_poisson_evidence_is_the_poisson_upper_tail():
    assert poisson_evidence(0, 3.0) == 0.0
    assert poisson_evidence(1, 0.5) == pytest.approx(-math.log10(1 - math.exp(-0.5)))
    assert poisson_evidence(2, 1.0) == pytest.approx(-math.log10(1 - 2 / math.e))
    assert poisson_evidence(3, 0.0) == math.inf


def test_fisher_evidence_of_one_test_is_that_test_and_of_two_is_x_times_1_minus_ln_x():
    assert fisher_evidence([]) == 0.0
    assert fisher_evidence([2.5]) == pytest.approx(2.5)
    # two p = 0.1: P(U1·U2 ≤ x) = x (1 - ln x) at x = 0.01
    assert fisher_evidence([1.0, 1.0]) == pytest.approx(-math.log10(0.01 * (1 + math.log(100))))


def test_kind_evidence_follows_its_null_and_is_conservative_against_the_exact_poisson_binomial():
    # a holds 4 items; b holds 10. Outside the pair: 90 incidences over 60 items; a's items are held
    # by 1, 1, 3 and 5 accounts in all (two of them shared with b, so R_a = 10, k = 2)
    n_a, n_b, r_a, k, incidences, distinct = 4, 10, 10, 2, 104, 60
    denom = incidences - n_a - n_b + distinct  # D' + U = 150
    # a's items have d' = 0, 0, 1, 3 other holders (+1 each): Σ r_i = (1 + 1 + 2 + 4) / 150 = (R_a - k) / 150
    lam = n_b * (r_a - k) / denom
    # b's items: 10, two shared with a (R_b = 14): λ(b→a) = 4 · 12 / 150 < λ(a→b), so a→b has the larger p
    got = kind_evidence(k, n_a, n_b, r_a, r_b=14, incidences=incidences, distinct=distinct)
    assert got == pytest.approx(poisson_evidence(k, lam)) and got < poisson_evidence(
        k, n_a * 12 / denom
    )
    # the exact law under the null: b holds a's item i with prob 1 - (1 - r_i)^n_b, independently
    probs = [1 - (1 - c / denom) ** n_b for c in (1, 1, 2, 4)]
    dist = np.zeros(len(probs) + 1)
    dist[0] = 1.0
    for p in probs:  # Poisson-binomial by convolution
        dist[1:] = dist[1:] * (1 - p) + dist[:-1] * p
        dist[0] *= 1 - p
    exact = dist[k:].sum()
    assert exact <= 10**-got <= 1.5 * exact  # conservative, and close
    # popular items prove little: the same overlap of items everyone holds is no evidence
    assert kind_evidence(2, 4, 10, r_a=4 * 40, r_b=10 * 40, incidences=1000, distinct=60) < 0.5
    # a big partner is expected to share: 2 items with an account of 2,000 prove nothing
    assert kind_evidence(2, 4, 2000, r_a=6, r_b=2010, incidences=4000, distinct=3000) < 0.5 < got


def test_communities_keep_a_dense_campaign_and_split_a_hub_from_its_leaves():
    edges = {("hub", f"leaf{i}"): 6.0 for i in range(30)}  # a sweeper's star
    edges |= {(f"key{i}", f"key{j}"): 3.0 for i in range(6) for j in range(i + 1, 6)}  # a campaign
    edges[("hub", "key0")] = 6.0
    found = communities(edges)
    keys = frozenset(f"key{i}" for i in range(6))
    assert keys in found or keys | {"hub"} in found
    hub = next(c for c in found if "hub" in c)
    # no chain through the hub: a hub with links of weight w keeps at most w / resolution leaves
    # (there the mean weight over all pairs, 2w/(L+1), stays above the resolution), not all 30
    assert sum(x.startswith("leaf") for x in hub) <= 6.0 / 2.0
    assert all(
        len(c) == 1 for c in found if "hub" not in c and any(x.startswith("leaf") for x in c)
    )


def test_attributed_share_is_nothing_at_chance_and_all_beyond_it():
    assert attributed_share(4.0, chance=4.5) == 0.0
    assert attributed_share(6.0, chance=4.5) == pytest.approx(0.5)
    assert attributed_share(40.0, chance=4.5) == 1.0
