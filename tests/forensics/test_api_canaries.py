"""API-only canaries where the truth is known: a tiny student fine-tuned on one account's
canary answers, served by ``distillguard serve --model DIR --no-guard`` and asked only through
its OpenAI-compatible API, traces to that account; the untrained model served the same way
traces to nobody."""

from __future__ import annotations

import pytest
import torch

from distillguard.errors import ConfigError
from distillguard.forensics.api_canaries import after_opening, api_canary_test
from distillguard.forensics.canaries import ServedCanary
from distillguard.forensics.respondent import Respondent
from distillguard.guard.canary import canary_text
from distillguard.models import load_model
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


def test_the_served_student_traces_to_the_leaking_account_only(student_dir):
    with serve_process("--model", str(student_dir), "--no-guard", env=ONE_THREAD) as url:
        result = api_canary_test(Respondent(url), SECRET, LEAKED + OTHER, decoys=19, max_tokens=128)
    by = {a.account: a for a in result.accounts}
    assert result.traced == ["leaker"], result.to_dict()
    assert by["leaker"].p_value < 1e-5 and by["leaker"].top1 >= 8
    assert by["bystander"].p_holm > 0.01


def test_the_untrained_model_behind_the_api_traces_to_nobody():
    with serve_process("--model", "tiny", "--no-guard", env=ONE_THREAD) as url:
        result = api_canary_test(Respondent(url), SECRET, LEAKED + OTHER, decoys=19, max_tokens=128)
    assert result.traced == [] and min(a.p_value for a in result.accounts) > 1e-3


def test_bad_input_says_what_to_do():
    assert after_opening("x The a of b is best", "The a of b") == " is best"
    with pytest.raises(ConfigError, match="not a URL"):
        api_canary_test(Respondent("tiny"), SECRET, LEAKED)
    with pytest.raises(ConfigError, match="decoys=0"):
        api_canary_test(Respondent("http://127.0.0.1:9"), SECRET, LEAKED, decoys=0)
