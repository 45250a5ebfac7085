"""Canary exposure where the truth is known: a tiny student trained on one account's canary
answers traces to that account; the untrained model and the other account's canaries do not
fire, and the per-canary p-values are uniform under the null."""

from __future__ import annotations

import random

import pytest
import torch
from scipy import stats
from sqlalchemy import insert

from distillguard.errors import ConfigError
from distillguard.forensics.canaries import ServedCanary, canary_test, rank_p_value, served_canaries
from distillguard.guard.canary import canary_text
from distillguard.guard.db import make_engine, migrate
from distillguard.guard.schema import LedgerRow
from distillguard.models import load_model
from tests.forensics.students import sft

SECRET = b"canary-test-secret"


def served(account: str, n: int) -> list[ServedCanary]:
    return [
        ServedCanary(
            account, f"req-{account}-{i}", [{"role": "user", "content": f"tell me about item {i}"}]
        )
        for i in range(n)
    ]


def train_on(base, canaries: list[ServedCanary], steps: int = 60):
    """A tiny student fine-tuned on these canaries as the answers to their requests."""
    return sft(
        base,
        [c.messages[-1]["content"] for c in canaries],
        [canary_text(SECRET, c.account, c.request_id) for c in canaries],
        steps=steps,
    )


@pytest.fixture(scope="module")
def models():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = load_model("tiny", device="cpu")
        leaked = served("leaker", 12)
        yield base, train_on(base, leaked), leaked, served("bystander", 12)
    finally:
        torch.set_num_threads(threads)


def test_the_student_traces_to_the_leaking_account_only(models):
    base, student, leaked, other = models
    result = canary_test(student, SECRET, leaked + other, decoys=19)
    by = {a.account: a for a in result.accounts}
    assert result.traced == ["leaker"]
    assert (
        by["leaker"].p_value < 1e-5 and by["leaker"].top1 >= 10
    )  # 12 of 12 first: 1.1e-6 at 19 decoys
    assert by["bystander"].p_holm > 0.01
    clean = canary_test(base, SECRET, leaked + other, decoys=19)
    assert clean.traced == [] and min(a.p_value for a in clean.accounts) > 0.001


def test_rank_p_values_are_uniform_under_the_null(models):
    """An untrained model has seen no canary: its per-canary p-values are uniform (KS test),
    which is what makes the combined p-value honest."""
    base = models[0]
    rng = random.Random(0)
    ps = []
    for c in served("null", 60):
        from distillguard.forensics.canaries import answer_logprobs
        from distillguard.guard.canary import canary

        opening, ending = canary(SECRET, c.account, c.request_id)
        fakes = [canary(SECRET, c.account, f"decoy:{c.request_id}:{j}")[1] for j in range(9)]
        scores = answer_logprobs(base, c.messages, [opening + e for e in [ending, *fakes]])
        ps.append(rank_p_value(scores[0], scores[1:], rng)[1])
    # discrete uniform on {0.1, ..., 1}: compare with its own CDF
    assert (
        stats.chisquare([sum(abs(p - k / 10) < 1e-9 for p in ps) for k in range(1, 11)]).pvalue
        > 0.001
    )


def test_rank_p_value_breaks_ties_at_random():
    rng = random.Random(1)
    assert rank_p_value(5.0, [1.0, 2.0, 3.0], rng) == (1, 0.25)
    assert rank_p_value(0.0, [1.0, 2.0, 3.0], rng) == (4, 1.0)
    ranks = {rank_p_value(1.0, [1.0, 1.0, 1.0], rng)[0] for _ in range(200)}
    assert ranks == {1, 2, 3, 4}


def test_served_canaries_come_from_the_ledger(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'l.db'}")
    migrate(engine)
    rows = [
        {
            "request_id": "r1",
            "ts": 1.0,
            "account_id": "a",
            "status": 200,
            "policy_action": "extracting:canary",
            "request_body": {"messages": [{"role": "user", "content": "q1"}]},
        },
        {
            "request_id": "r2",
            "ts": 2.0,
            "account_id": "a",
            "status": 200,
            "policy_action": "suspect:log,throttle",
        },
        {
            "request_id": "r3",
            "ts": 3.0,
            "account_id": "b",
            "status": 200,
            "policy_action": "extracting:log,canary",
            "request_body": {"messages": [{"role": "user", "content": "q3"}]},
        },
        {
            "request_id": "r4",
            "ts": 4.0,
            "account_id": "b",
            "status": 429,
            "policy_action": "extracting:canary",
        },
    ]
    with engine.begin() as conn:
        conn.execute(
            insert(LedgerRow), [{"stream": False, "request_body": None, **r} for r in rows]
        )
    got = served_canaries(engine)
    assert [(c.account, c.request_id) for c in got] == [("a", "r1"), ("b", "r3")]
    assert got[0].messages == [{"role": "user", "content": "q1"}]
    assert [c.request_id for c in served_canaries(engine, accounts=["b"])] == ["r3"]
    engine.dispose()


def test_bad_input_is_refused(models):
    with pytest.raises(ConfigError, match="no canaries"):
        canary_test(models[0], SECRET, [])
    with pytest.raises(ConfigError, match="decoys"):
        canary_test(models[0], SECRET, served("a", 1), decoys=0)


def test_cli_traces_the_student_from_the_ledger(models, tmp_path):
    """The ledger records which canaries went to whom; the CLI reads them and tests a saved student."""
    import json

    from tests.servers import run_cli

    _, student, leaked, other = models
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    migrate(engine)
    with engine.begin() as conn:
        conn.execute(
            insert(LedgerRow),
            [
                {
                    "request_id": c.request_id,
                    "ts": float(i),
                    "account_id": c.account,
                    "status": 200,
                    "stream": False,
                    "policy_action": "extracting:canary",
                    "request_body": {"model": "tiny", "messages": c.messages},
                    "response_text": canary_text(SECRET, c.account, c.request_id),
                }
                for i, c in enumerate(leaked + other)
            ],
        )
    engine.dispose()
    student_dir = tmp_path / "student"
    student.model.save_pretrained(student_dir)
    student.tokenizer.save_pretrained(student_dir)
    out = run_cli(
        "forensics",
        "canaries",
        "--suspect",
        str(student_dir),
        "--db",
        str(tmp_path / "ledger.db"),
        "--decoys",
        "19",
        "--device",
        "cpu",
        "--json",
        env={"DISTILLGUARD_WATERMARK_SECRET": SECRET.decode(), "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["traced"] == ["leaker"] and SECRET.decode() not in out.stdout + out.stderr
    assert {a["account"]: a["canaries"] for a in result["accounts"]} == {
        "leaker": 12,
        "bystander": 12,
    }
    # the untraced account comes with the test's power at its 12 canaries
    power = result["power"]
    assert power["account"] == "bystander" and power["units"] == 12
    assert power["test"] == "fisher-rank" and power["level"] == pytest.approx(1e-3 / 2)
    assert power["ci"][0] <= power["observed"] <= power["ci"][1]
    # the control: an untrained student cut from the teacher by spec, as a user names it
    control = run_cli(
        "forensics",
        "canaries",
        "--suspect",
        "prune:1:even",
        "--teacher",
        "tiny",
        "--db",
        str(tmp_path / "ledger.db"),
        "--decoys",
        "19",
        "--device",
        "cpu",
        env={"DISTILLGUARD_WATERMARK_SECRET": SECRET.decode(), "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert control.returncode == 0, control.stderr
    said = " ".join(control.stdout.split())  # rich may wrap lines when not on a terminal
    assert "traced to: no account" in said and "not traced:" in said
    assert "with 80% power" in said and "serve more canaries" in said


def test_a_prompt_longer_than_the_suspects_context_is_left_out_and_counted(models):
    """Found at the embedded teacher's sizes (bench/journeys.py): a canary served on a 1,000-token
    ShareGPT prompt stopped the whole test. Canaries the suspect cannot read are left out and
    counted; the rest are scored on the suspect's whole context, not a fixed 512 tokens."""
    base, student, leaked, _ = models
    ctx = base.context_length
    long = [
        ServedCanary("leaker", f"long-{i}", [{"role": "user", "content": "word " * (2 * ctx)}])
        for i in range(3)
    ]
    result = canary_test(student, SECRET, leaked + long, decoys=19)
    assert result.skipped_too_long == 3 and result.to_dict()["skipped_too_long"] == 3
    (leaker,) = result.accounts
    assert leaker.canaries == len(leaked) and result.traced == ["leaker"]
    with pytest.raises(ConfigError, match="none of the 3 canary prompts fits"):
        canary_test(student, SECRET, long, decoys=19)
