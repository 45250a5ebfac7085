"""Behavioural similarity where the truth is known, on tiny models (no stub).

- positive: the teacher (a tiny model fine-tuned to answer in one style) and a copy of its
  weights, and a student fine-tuned on the teacher's greedy answers to other prompts, agree with
  it far more than unrelated tiny models do, untrained or trained on another style;
- null: an unrelated model as the suspect against another unrelated control; over 12 seeded
  repeats (new models and probes each time) its p-values look uniform (bound below).
"""

from __future__ import annotations

import copy as copying

import numpy as np
import pytest
import torch
from scipy import stats

from distillguard.forensics.respondent import Respondent
from distillguard.forensics.similarity import permutation_p, similarity_test, token_f1
from distillguard.models import load_model
from tests.forensics.students import sft

TOPICS = ["cats", "rain", "maths", "tea", "ships", "jazz", "bread", "stars"]
TRAIN = [f"question {i}: tell me about {t}" for i, t in enumerate(TOPICS * 4)]
PROBES = [f"please explain {t} to a friend ({i})" for i, t in enumerate(TOPICS * 2)]


def style(topic: str) -> str:
    return f"Sure! {topic} is a fine topic. Here is what I know about {topic}."


def other_style(topic: str) -> str:
    return f"{topic}? Ask someone else, I only talk about boats."


def tiny(seed: int) -> Respondent:
    spec = f"tiny:seed={seed}"
    return Respondent(spec, lm=load_model(spec, device="cpu"))


def copy_of(lm):
    twin = copying.copy(lm)
    twin.model = copying.deepcopy(lm.model)
    return twin


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher():
    lm = sft(load_model("tiny", device="cpu"), TRAIN, [style(t) for t in TOPICS * 4])
    return Respondent("teacher", lm=lm)


def test_token_f1_and_exact_permutation_p():
    assert token_f1("the cat sat", "the cat sat") == 1.0
    assert token_f1("the cat", "a dog") == 0.0
    assert token_f1("", "") == 1.0
    # one control, 6 probes, suspect higher on each: exact sign flips give 1 / 2^6
    s, c = np.ones(6), np.zeros(6)
    assert permutation_p(s, [c]) == pytest.approx(1 / 64)


def test_the_teachers_weights_and_its_student_agree_far_more_than_unrelated_models(teacher):
    taught = teacher.answer(TRAIN, max_tokens=32)
    student = sft(load_model("tiny:seed=1", device="cpu"), TRAIN, taught, seed=1)
    other = sft(
        load_model("tiny:seed=2", device="cpu"), TRAIN, [other_style(t) for t in TOPICS * 4]
    )
    controls = {"untrained": tiny(7), "other-style": Respondent("other", lm=other)}
    copy = Respondent("copy", lm=copy_of(teacher.lm))
    copy = similarity_test(copy, teacher, controls, prompts=PROBES)
    assert copy.details["mode"] == "next-token"
    assert copy.statistic == 1.0 and max(copy.controls.values()) < 0.5
    assert copy.details["permutation_p"] < 1e-3 and not copy.within_controls_range
    assert copy.p_value == pytest.approx(1 / 3)  # rank 1 of 3 models: what 2 controls can show
    # the student was taught on other prompts: on the probes it still answers like the teacher
    distilled = similarity_test(
        Respondent("student", lm=student), teacher, controls, prompts=PROBES
    )
    assert distilled.statistic > max(distilled.controls.values())
    assert distilled.details["permutation_p"] < 1e-3
    assert distilled.details["top_k_overlap"]["suspect"] > max(
        v for k, v in distilled.details["top_k_overlap"].items() if k != "suspect"
    )


def test_unrelated_suspects_get_uniform_p_values():
    """The permutation p over probes, 12 repeats, each with a fresh teacher, suspect, control
    and probe set (so the models, not only the probes, are drawn anew). Bound: a KS test
    against U(0, 1) does not reject at 0.01, and at most 3 of 12 p-values are below 0.1
    (binomial(12, 0.1): P(>= 4) = 0.026)."""
    ps = []
    for r in range(12):
        prompts = [f"probe {r}-{i}: say something about {t}" for i, t in enumerate(TOPICS * 2)]
        out = similarity_test(
            tiny(100 + r), tiny(200 + r), {"control": tiny(300 + r)}, prompts=prompts, seed=r
        )
        ps.append(out.details["permutation_p"])
    assert stats.kstest(ps, "uniform").pvalue > 0.01, ps
    assert sum(p < 0.1 for p in ps) <= 3, ps


def test_it_says_why_it_could_not_run(teacher):
    assert "no controls" in similarity_test(teacher, teacher, {}, prompts=PROBES).why_not
    assert "no teacher" in similarity_test(teacher, None, {"c": teacher}, prompts=PROBES).why_not
