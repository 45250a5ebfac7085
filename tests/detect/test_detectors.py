"""Each built-in detector on a tiny known case, both ways: it fires on the attacker pattern and
stays quiet on a benign-like one. Embedding detectors get synthetic unit vectors around known
topic centres (truth known, no model needed)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from distillguard.detect.config import DetectConfig
from distillguard.detect.features import extract
from distillguard.detect.linking import Linker
from distillguard.detect.reference import Reference, nn_distances
from distillguard.detect.registry import Context, Detector, detectors, register, select
from distillguard.errors import ConfigError
from tests.detect.conftest import topic_embeddings
from tests.detect.synth import T0, benign_account, bulk_account, record


def run(name: str, records: list[dict], embeddings=None, reference=None, config=None) -> Detector:
    det = detectors()[name](Context(config or DetectConfig(), reference))
    for i, r in enumerate(records):
        det.observe(extract(r), None if embeddings is None else embeddings[i])
    return det


def test_volume_fires_on_bulk_not_on_a_person():
    rng = random.Random(0)
    bulk = run("volume", bulk_account(rng, "b", 500))
    person = run("volume", benign_account(rng, "p"))
    assert bulk.score() > person.score() + 2.0
    assert "requests" in bulk.reasons()[0]


def test_timing_fires_on_a_timer_not_on_bursts():
    rng = random.Random(1)
    timer = run("timing", bulk_account(rng, "b", 100))
    person = run("timing", benign_account(rng, "p", days=5))
    assert timer.score() > 2.0  # CV ~0.06: -log(CV) ~ 2.8
    assert person.score() < 0.0  # bursty: CV > 1
    assert run("timing", bulk_account(rng, "b", 5)).score() == 0.0  # too few gaps: silent


def test_shape_fires_on_harvest_shape_not_on_chat():
    rng = random.Random(2)
    harvest = run("shape", bulk_account(rng, "b", 100))
    chat = run("shape", benign_account(rng, "p", days=3))
    assert harvest.score() > 2.5  # logprobs, large max_tokens, no continuation
    assert chat.score() < 1.5
    reasons = harvest.reasons()[0]
    assert "logprobs 100%" in reasons and "large max_tokens 100%" in reasons


def test_fresh_counts_conversations_opened_over_the_whole_life_discounted_by_follow_ups():
    rng = random.Random(3)
    # 150 single-turn prompts over 3 days: P(Bin(150, 1/2) >= 150) = 2^-150
    sweep = [record("s", T0 + i * 1700.0, f"question {i}") for i in range(150)]
    assert run("fresh", sweep).score() == pytest.approx(150 * math.log10(2.0))
    # 9 fresh of 10: P(X >= 9) = 11/1024
    nine = [record("n", T0 + i * 600.0, f"q {i}", history=int(i == 5)) for i in range(10)]
    assert run("fresh", nine).score() == pytest.approx(-math.log10(11 / 1024))
    # 40 conversations of 3 turns each (40 fresh of 120): a person who follows up, however many
    chat = [
        record("p", T0 + (3 * c + k) * 600.0, f"topic {c}", history=k)
        for c in range(40)
        for k in range(3)
    ]
    det = run("fresh", chat)
    assert det.score() == 0.0
    assert (
        "opened 40 conversations" in det.reasons()[0] and "continued 80 times" in det.reasons()[0]
    )
    # it accumulates: the same sweep over more days only grows (no window forgets the first days)
    scores = []
    det = detectors()["fresh"](Context(DetectConfig(), None))
    for r in sweep:
        det.observe(extract(r), None)
        scores.append(det.score())
    assert scores == sorted(scores) and scores[-1] > scores[49] + 20 and scores[49] > scores[9] + 10
    assert (
        run("fresh", benign_account(rng, "q", days=3)).score() < run("fresh", sweep).score() - 1.0
    )


def test_fresh_binomial_evidence_matches_scipy_and_its_bound_where_the_tail_underflows():
    from scipy import stats

    from distillguard.detect.fresh import binomial_evidence

    for f, n in [(9, 10), (60, 100), (51, 100), (150, 150), (1400, 1500)]:
        assert binomial_evidence(f, n) == pytest.approx(
            -stats.binom.logsf(f - 1, n, 0.5) / math.log(10), rel=1e-9
        )
    assert binomial_evidence(50, 100) == binomial_evidence(3, 10) == 0.0
    # 2^-1500 underflows: the Chernoff bound n·KL(1 || 1/2) = n·log10(2) is exact for f = n
    assert binomial_evidence(1500, 1500) == pytest.approx(1500 * math.log10(2.0))


SUBJECTS_ = (
    "the ocean",
    "black holes",
    "a lost dog",
    "jazz",
    "the Roman Empire",
    "coffee",
    "volcanoes",
    "DNA",
)


def test_template_fires_on_a_sweep_of_refilled_skeletons_not_on_a_person():
    rng = random.Random(8)
    skeletons = ("Write a {} about {}.", "Explain {} to a {}.", "Give me {} facts about {}.")
    sweep = [
        record(
            "t",
            T0 + 5 * i,
            rng.choice(skeletons).format(
                rng.choice(("poem", "story", "five", "child")), rng.choice(SUBJECTS_)
            ),
        )
        for i in range(80)
    ]
    det = run("template", sweep)
    person = run("template", benign_account(rng, "p", days=3))
    habit = run(
        "template",
        [
            record("h", T0 + 60 * i, f"Translate this into French: {w}")
            for i, w in enumerate(rng.choices(WORDS_, k=40))
        ],
    )  # one skeleton, a habit
    assert (
        det.score() > 1.5 and max(person.score(), habit.score()) < det.score() / 2
    )  # (synth people repeat one skeleton)
    assert "skeleton" in det.reasons()[0]
    assert run("template", sweep[:1]).score() == 0.0


def test_cot_fires_on_reasoning_requests_not_on_an_occasional_one():
    harvest = [
        record("r", T0 + 3 * i, f"Solve {i} + {i}. Let's think step by step.") for i in range(40)
    ]
    person = [
        record("p", T0 + 60 * i, f"question {i}" + (" step by step" if i % 10 == 0 else ""))
        for i in range(40)
    ]
    assert run("cot", harvest).score() > 0.8 > 0.2 > run("cot", person).score()
    assert "chain of thought" in run("cot", harvest).reasons()[0]


def test_shape_researcher_with_logprobs_alone_scores_at_most_one_trait():
    rng = random.Random(7)
    recs = [
        record(
            "r",
            T0 + 60 * i,
            " ".join(rng.choices(WORDS_ * 3, k=rng.randint(4, 9))),
            history=1,
            logprobs=True,
            top_logprobs=5,
        )
        for i in range(50)
    ]
    assert run("shape", recs).score() <= 1.0


def _reference(space, rng) -> Reference:
    # benign users dwell: streams of 40 prompts around two topics each
    streams = [
        topic_embeddings(rng, space[rng.choice(len(space), 2, replace=False)], 40, spread=0.6)
        for _ in range(30)
    ]
    return Reference(
        embeddings=topic_embeddings(rng, space, 256, spread=0.6),
        centers=space.astype(np.float32),
        distances=np.sort(np.concatenate([nn_distances(s) for s in streams])),
    )


def _prompts(n: int) -> list[dict]:
    return [record("a", T0 + i, f"prompt {i}") for i in range(n)]


@pytest.mark.parametrize("name", ["coverage", "prada"])
def test_sweep_detectors_fire_on_a_sweep_not_on_a_dweller(name, space):
    rng = np.random.default_rng(3)
    ref = _reference(space, rng)
    sweep = topic_embeddings(rng, space, 64, spread=0.6)  # every topic
    dwell = topic_embeddings(rng, space[[2, 9]], 64, spread=0.6)  # two topics
    s_sweep = run(name, _prompts(64), sweep, ref).score()
    s_dwell = run(name, _prompts(64), dwell, ref).score()
    assert s_sweep > s_dwell
    if name == "prada":
        assert s_sweep > 3.0 and s_dwell < 2.0  # -log10 p
    else:
        assert s_sweep > 2.3 and s_dwell < 0.8  # nats: ~log 16 vs ~log 2


def test_mmd_fires_on_off_distribution_prompts_not_on_reference_like_ones(space):
    rng = np.random.default_rng(4)
    ref = _reference(space, rng)
    same = run("mmd", _prompts(64), topic_embeddings(rng, space, 64, spread=0.6), ref)
    other = rng.normal(size=(4, space.shape[1]))
    other /= np.linalg.norm(other, axis=1, keepdims=True)
    off = run("mmd", _prompts(64), topic_embeddings(rng, other, 64, spread=0.6), ref)
    # m·MMD²: O(1) when the window is drawn like the reference, growing with m when it is not
    assert off.score() > 10 * max(same.score(), 0.1)
    assert same.score() < 1.0
    assert "MMD" in off.reasons()[0]


def test_embedding_detectors_are_silent_below_min_prompts(space):
    rng = np.random.default_rng(5)
    ref = _reference(space, rng)
    for name in ("mmd", "coverage", "prada"):
        assert run(name, _prompts(10), topic_embeddings(rng, space, 10), ref).score() == 0.0


def test_linking_joins_accounts_that_share_templates_system_prompt_and_network():
    linker = Linker(min_evidence=3)
    rng = random.Random(9)
    for j in range(
        40
    ):  # people: their own networks, some their own system prompt, one common habit
        system = f"You are my assistant number {j}." if j % 3 == 0 else None
        for i in range(6):
            linker.observe(
                extract(
                    record(
                        f"p{j}",
                        T0 + i,
                        f"how do I fix my {rng.choice(WORDS_)}",
                        ip=f"10.{j}.0.1",
                        **({"system": system} if system else {}),
                    )
                )
            )
    for i in range(6):
        for acct, last in (("x1", 2), ("x2", 3)):
            linker.observe(
                extract(
                    record(
                        acct,
                        T0 + i,
                        f"Write a poem about the {WORDS_[i]} for a {last}-year-old.",
                        system="You are GenBot v7.",
                        ip=f"45.83.17.{last}",
                    )
                )
            )
    assert linker.cluster_id("x1") == linker.cluster_id("x2") is not None
    assert linker.cluster_size("x1") == 2 and linker.cluster_size("p1") == 1
    [(other, link)] = linker.links("x1")
    assert (
        other == "x2"
        and link.shared["system"] == 1
        and link.shared["network"] == 1
        and link.shared["template"] == 1
    )
    # each kind weighed by its rarity among 42 accounts; the kinds combined make the link
    assert min(link.by_kind["network"], link.by_kind["system"], link.by_kind["template"]) > 1.0
    assert link.weight > max(link.by_kind.values()) and "same network ×1" in linker.describe(link)
    assert "45.83.17.0/24" in linker.describe(link)


WORDS_ = ("ocean", "moon", "forest", "city", "desert", "river")


def test_linking_ignores_what_benign_users_commonly_share():
    common = frozenset(
        {extract(record("a", 0, "x", system="You are a helpful assistant.")).system_hash}
    )
    linker = Linker(min_evidence=2, common=common)
    for i in range(5):
        for acct in ("u1", "u2"):
            linker.observe(
                extract(
                    record(
                        acct,
                        T0 + i,
                        f"question {i} from {acct}",
                        system="You are a helpful assistant.",
                    )
                )
            )
    assert linker.cluster_size("u1") == 1


def test_plugins_register_like_builtins_and_unknown_names_are_rejected():
    @register
    class Always(Detector):
        name = "test-always"

        def observe(self, f, embedding):
            self.n = getattr(self, "n", 0) + 1

        def score(self):
            return float(self.n)

        def reasons(self):
            return [f"{self.n} requests"]

    assert detectors()["test-always"] is Always
    assert {
        "volume",
        "timing",
        "shape",
        "template",
        "cot",
        "mmd",
        "prada",
        "coverage",
        "fresh",
        "linking",
    } <= set(detectors())
    assert select(["test-always"]) == [Always]
    with pytest.raises(ConfigError, match="unknown detector"):
        select(["nope"])
