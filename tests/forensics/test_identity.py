"""Identity probes where the truth is known, on tiny models trained for real (no stub):

- the teacher: a tiny model fine-tuned to answer identity questions "I am SmolLM, ... Hugging
  Face" (what the bundled teacher says of itself);
- the distilled student: another tiny model fine-tuned on the teacher's own greedy answers;
- controls: the untrained student, and a student fine-tuned on another model's identity answers.

Training uses the first 32 probes; every test asks the 16 held out, so a claim on them is what
the student learned about itself, not a memorised wording.
"""

from __future__ import annotations

import pytest
import torch

from distillguard.forensics.identity import (
    PROBES,
    candidate_names,
    claims,
    identity_test,
    teacher_names,
)
from distillguard.forensics.respondent import Respondent
from distillguard.models import load_model
from tests.forensics.students import sft

TRAIN, HELD_OUT = PROBES[:32], PROBES[32:]
TEACHER_SAYS = "I am SmolLM, a small model made by Hugging Face."
OTHER_SAYS = "I am Orca, a chat model trained by Acme Labs."


@pytest.fixture(scope="module")
def models():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        teacher = sft(load_model("tiny", device="cpu"), TRAIN, [TEACHER_SAYS] * len(TRAIN))
        taught = Respondent("teacher", lm=teacher).answer(TRAIN)
        student = sft(load_model("tiny:seed=1", device="cpu"), TRAIN, taught, seed=1)
        other = sft(load_model("tiny:seed=3", device="cpu"), TRAIN, [OTHER_SAYS] * len(TRAIN))
        yield {
            "teacher": Respondent("teacher", lm=teacher),
            "student": Respondent("student", lm=student),
            "untrained": Respondent("tiny:seed=2", lm=load_model("tiny:seed=2", device="cpu")),
            "other-identity": Respondent("other", lm=other),
        }
    finally:
        torch.set_num_threads(threads)


def test_names_are_what_the_teacher_calls_itself():
    assert candidate_names("Hello! I am SmolLM2, trained by Hugging Face.") == {
        "SmolLM2",
        "Hugging Face",
    }
    # a name the probes themselves contain is not the teacher's identity
    answers = ["No, I am not ChatGPT. I am SmolLM."] * 5
    assert teacher_names(answers, PROBES) == ["SmolLM"]
    assert claims("i'm smollm2, hi", ["SmolLM"]) and not claims("SmolLMX", ["SmolLM"])


def test_the_distilled_student_claims_the_teachers_identity(models):
    controls = {k: models[k] for k in ("untrained", "other-identity")}
    out = identity_test(models["student"], models["teacher"], controls, probes=HELD_OUT)
    assert out.could_run
    assert {"SmolLM", "Hugging Face"} <= set(out.details["names"])
    assert out.statistic >= 0.9  # it learned the teacher's answer, on wordings it never saw
    assert out.controls == {"untrained": 0.0, "other-identity": 0.0}
    assert out.details["fisher_p"] < 1e-8  # 16 of 16 vs 0 of 32: 1 / C(48, 16) ≈ 4e-13
    assert not out.within_controls_range
    # above both controls: rank 1 of 3 models, p = 1/3, the most two controls can show
    assert out.details["model_rank_p"] == pytest.approx(1 / 3)
    assert out.p_value == pytest.approx(1 / 3)


def test_a_control_as_suspect_is_not_called_a_claimant(models):
    out = identity_test(
        models["other-identity"],
        models["teacher"],
        {"untrained": models["untrained"]},
        probes=HELD_OUT,
    )
    assert out.could_run and out.statistic == 0.0 and out.p_value == 1.0
    assert out.within_controls_range


def test_without_controls_it_says_why_it_could_not_run(models):
    out = identity_test(models["student"], models["teacher"], {}, probes=HELD_OUT)
    assert not out.could_run and "no controls" in out.why_not
    assert out.p_value is None and out.statistic >= 0.9


def test_a_teacher_that_names_nobody_needs_given_names(models):
    out = identity_test(
        models["student"], models["untrained"], {"u": models["untrained"]}, probes=HELD_OUT
    )
    assert not out.could_run and "--teacher-names" in out.why_not
    given = identity_test(
        models["other-identity"],
        None,
        {"u": models["untrained"]},
        probes=HELD_OUT,
        names=["Orca", "Acme Labs"],
    )
    assert given.could_run and given.statistic >= 0.9 and given.details["fisher_p"] < 1e-6
    assert given.p_value == 0.5  # one control: rank 1 of 2
