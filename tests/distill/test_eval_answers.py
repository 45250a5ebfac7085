"""`distill eval` saves every answer it scores beside its metrics, and leaves out prompts over
--max-prompt-tokens, counted (issue 28). Tiny models, the real CLI in a subprocess."""

from __future__ import annotations

import json

import pytest

from distillguard.models import load_model
from tests.servers import run_cli

CAP = 100


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "heldout.jsonl"
    prompts = [f"held-out question {i}?" for i in range(3)] + ["a very long pasted text " * 10]
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path, prompts


def test_eval_writes_the_answers_it_scored_beside_its_report(heldout, tmp_path):
    path, prompts = heldout
    teacher = load_model("tiny", device="cpu")
    over = [p for p in prompts if len(teacher.chat_ids([{"role": "user", "content": p}])) > CAP]
    assert over == prompts[3:]
    out = tmp_path / "eval.json"
    res = run_cli(
        "distill", "eval", "--student", "tiny:seed=3", "--student", "tiny:seed=4",
        "--teacher", "tiny", "--prompts", str(path), "--max-new-tokens", "8",
        "--max-prompt-tokens", str(CAP), "--out", str(out), env={"COLUMNS": "200"}, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    said = " ".join(res.stderr.split())
    answers = tmp_path / "eval.answers.jsonl"
    assert f"skipped 1 of 4 prompts over --max-prompt-tokens {CAP}" in said
    assert f"3 prompts' answers in {answers}" in said
    reports = json.loads(out.read_text())
    lines = [json.loads(x) for x in answers.read_text().splitlines()]
    # one line per prompt scored, in order, with the teacher's answer and each student's
    assert [x["messages"] for x in lines] == [[{"role": "user", "content": p}] for p in prompts[:3]]
    assert all(isinstance(x["teacher"], str) for x in lines)
    for report in reports:
        spec = report["student"]["spec"]
        assert report["prompts"] == 3 and report["source"]["over_prompt_cap"] == 1
        assert report["source"]["answers"] == str(answers)
        mine = [x["students"][spec] for x in lines]
        # the file holds what the metrics were computed from
        assert sum(m["rouge_l"] for m in mine) / 3 == pytest.approx(report["student"]["rouge_l"])
        assert sum(m["exact_match"] for m in mine) / 3 == pytest.approx(
            report["student"]["exact_match"]
        )
        assert all(m["exact_match"] == (m["answer"] == x["teacher"]) for m, x in zip(mine, lines))
    assert "answers" not in reports[0]  # the report stays the metrics


def test_every_prompt_over_the_cap_is_an_error_naming_the_flag(heldout, tmp_path):
    path, _ = heldout
    res = run_cli(
        "distill", "eval", "--student", "tiny", "--teacher", "tiny", "--prompts", str(path),
        "--max-prompt-tokens", "5", timeout=600,
    )  # fmt: skip
    assert res.returncode == 2 and "all 4 prompts are over --max-prompt-tokens 5" in res.stderr
