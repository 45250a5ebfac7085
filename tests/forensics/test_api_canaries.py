"""API-only canaries where the truth is known, every suspect served by ``distillguard serve
--model DIR --no-guard`` and asked only through its OpenAI-compatible API.

- Likelihood scoring (the endpoint's prompt logprobs, ``/v1/completions`` with ``echo``): the
  forensics report's student (tests/forensics/report_case.py: trained on its teacher's answers
  and on 12 canaries served to "leaker") traces to "leaker" and to no one else; its scores are
  the weights test's own numbers; the untrained model traces to nobody.
- Greedy-answer scoring, the fallback where the endpoint refuses prompt logprobs (here: the
  upstream proxy, which has no model to score with): a student fine-tuned on the canary answers
  alone traces; the untrained model does not.
"""

from __future__ import annotations

import pytest
import torch

from distillguard.errors import ConfigError
from distillguard.forensics.api_canaries import (
    after_opening,
    api_canary_test,
    chat_turn,
    likelihood_scores,
)
from distillguard.forensics.canaries import (
    ServedCanary,
    _messages,
    answer_logprobs,
    served_canaries,
)
from distillguard.forensics.respondent import Respondent
from distillguard.guard.canary import canary, canary_text
from distillguard.guard.db import make_engine
from distillguard.models import load_model, load_tokenizer
from tests.forensics import report_case as case_module
from tests.forensics.students import sft
from tests.servers import serve_process

SECRET = b"api-canary-test-secret"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def served(account: str, n: int) -> list[ServedCanary]:
    return [
        ServedCanary(
            account, f"req-{account}-{i}", [{"role": "user", "content": f"tell me about item {i}"}]
        )
        for i in range(n)
    ]


LEAKED, OTHER = served("leaker", 12), served("bystander", 12)


# ---- likelihood: the report's student --------------------------------------------------------


@pytest.fixture(scope="module")
def report_canaries(report_case):
    root, dirs = report_case
    engine = make_engine(f"sqlite:///{root / 'ledger.db'}")
    try:
        return served_canaries(engine)
    finally:
        engine.dispose()


def test_the_report_student_behind_its_api_traces_to_the_leaker_by_likelihood(
    report_case, report_canaries
):
    """The student the report traces by its weights (all 12 canaries ranked first) is traced as
    a URL too, by the same statistic: its endpoint's prompt logprobs of each answer written in
    the teacher's chat template. Its greedy answers do not trace it."""
    _, dirs = report_case
    secret = case_module.SECRET.encode()
    assert {c.account for c in report_canaries} == {"leaker", "bystander"}
    with serve_process("--model", str(dirs["student"]), "--no-guard", env=ONE_THREAD) as url:
        suspect = Respondent(url, template=str(dirs["teacher"]))
        result = api_canary_test(suspect, secret, report_canaries, decoys=19)
        # the API's numbers are the weights test's: log p(answer | request) in the template
        c = report_canaries[0]
        opening, ending = canary(secret, c.account, c.request_id)
        scores = likelihood_scores(suspect, suspect.template, secret, [c], decoys=3)[0]
        greedy = api_canary_test(
            suspect, secret, report_canaries, decoys=19, max_tokens=128, scoring="greedy-answer"
        )
    lm = load_model(str(dirs["student"]), device="cpu")
    fakes = [canary(secret, c.account, f"decoy:{c.request_id}:{j}")[1] for j in range(3)]
    direct = answer_logprobs(lm, _messages(c.messages), [opening + e for e in [ending, *fakes]])
    assert scores == pytest.approx(direct, abs=2e-3)

    by = {a.account: a for a in result.accounts}
    assert result.scoring == "likelihood" and "prompt logprobs" in result.scoring_why
    assert result.traced == ["leaker"], result.to_dict()
    assert by["leaker"].top1 == 12 and by["leaker"].p_holm < 1e-5
    assert by["bystander"].p_holm > 0.01
    # its greedy answers rank the true ending first for only 2 of 12 (p 0.08): a preference
    # the likelihood sees and the answer hides; they still point the right way
    g = {a.account: a for a in greedy.accounts}
    assert greedy.traced == [] and g["leaker"].top1 <= 4
    assert g["leaker"].mean_rank < g["bystander"].mean_rank


def test_the_untrained_model_behind_its_api_traces_to_nobody(report_canaries, report_case):
    _, dirs = report_case
    secret = case_module.SECRET.encode()
    with serve_process("--model", "tiny", "--no-guard", env=ONE_THREAD) as url:
        suspect = Respondent(url, template=str(dirs["teacher"]))
        likelihood = api_canary_test(suspect, secret, report_canaries, decoys=19)
        greedy = api_canary_test(
            suspect, SECRET, LEAKED + OTHER, decoys=19, max_tokens=128, scoring="greedy-answer"
        )
    assert likelihood.scoring == "likelihood" and likelihood.traced == []
    assert min(a.p_value for a in likelihood.accounts) > 1e-3
    assert greedy.scoring == "greedy-answer" and greedy.traced == []
    assert min(a.p_value for a in greedy.accounts) > 1e-3


# ---- greedy answers: the fallback ------------------------------------------------------------


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        student = sft(
            load_model("tiny", device="cpu"),
            [c.messages[-1]["content"] for c in LEAKED],
            [canary_text(SECRET, c.account, c.request_id) for c in LEAKED],
            steps=200,  # enough that its greedy answers repeat the canaries' endings
        )
    finally:
        torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("api-canary-student")
    student.model.save_pretrained(path)
    student.tokenizer.save_pretrained(path)
    return path


def test_an_endpoint_without_prompt_logprobs_falls_back_to_greedy_answers(student_dir):
    """Behind the upstream proxy (no model of its own: /v1/completions answers 404) the test
    falls back to the greedy answers, says so, and still traces the canary-trained student."""
    with (
        serve_process("--model", str(student_dir), "--no-guard", env=ONE_THREAD) as upstream,
        serve_process("--upstream", upstream, "--no-guard", env=ONE_THREAD) as url,
    ):
        result = api_canary_test(
            Respondent(url, template="tiny"), SECRET, LEAKED + OTHER, decoys=19, max_tokens=128
        )
    by = {a.account: a for a in result.accounts}
    assert result.scoring == "greedy-answer" and "404" in result.scoring_why
    assert result.to_dict()["scoring"] == "greedy-answer"
    assert result.traced == ["leaker"], result.to_dict()
    assert by["leaker"].p_value < 1e-5 and by["leaker"].top1 >= 8
    assert by["bystander"].p_holm > 0.01


def test_bad_input_says_what_to_do():
    assert after_opening("x The a of b is best", "The a of b") == " is best"
    text, start, end = chat_turn(load_tokenizer("tiny"), [{"role": "user", "content": "q"}], "ans")
    assert text == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\nans<|im_end|>"
    assert text[start:end] == "ans<|im_end|>"
    with pytest.raises(ConfigError, match="not a URL"):
        api_canary_test(Respondent("tiny"), SECRET, LEAKED)
    with pytest.raises(ConfigError, match="decoys=0"):
        api_canary_test(Respondent("http://127.0.0.1:9"), SECRET, LEAKED, decoys=0)
    with pytest.raises(ConfigError, match="scoring='best'"):
        api_canary_test(Respondent("http://127.0.0.1:9"), SECRET, LEAKED, scoring="best")
    with pytest.raises(ConfigError, match="no chat template"):
        api_canary_test(Respondent("http://127.0.0.1:9"), SECRET, LEAKED, scoring="likelihood")
