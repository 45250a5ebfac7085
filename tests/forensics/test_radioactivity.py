"""Radioactivity where the truth is known: tiny students that did or did not learn watermarked text.

A tiny teacher (random 2-layer model, printable ASCII only so that text round-trips through the
byte tokenizer exactly) answers prompts watermarked with the keys of two accounts (a strong
δ=8, so that a few dozen steps suffice); a
tiny student with other random weights is fine-tuned a few dozen SFT steps on those answers
(the leaked student), another on the teacher's unwatermarked answers (the clean student).
Clean controls: the teacher itself, the untrained student, the clean student.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import binom
from transformers import LogitsProcessor

from distillguard.errors import ConfigError
from distillguard.forensics import (
    chernoff_log_p,
    closed_test,
    generate_answers,
    open_test,
)
from distillguard.models import load_model
from distillguard.watermark import WatermarkLogitsProcessor, WatermarkParams, account_key
from tests.forensics.students import sft
from tests.servers import run_cli, server_process

SECRET = "forensics-test-secret"
PARAMS = WatermarkParams(delta=8.0)
ACCOUNTS = [f"acct-{i:02d}" for i in range(20)]
LEAKERS = ["acct-03", "acct-11"]  # 2 of the 20 accounts leaked the student's training data
TOPICS = ["cats", "rain", "maths", "tea", "ships", "jazz", "bread", "stars"]
TRAIN_PROMPTS = [f"question {i}: tell me about {t}" for i, t in enumerate(TOPICS * 6)]
ONE_THREAD = {
    "OMP_NUM_THREADS": "1"
}  # subprocesses on a busy 2-core machine: one thread spins least
EVAL_PROMPTS = [f"please explain {t} to a friend ({i})" for i, t in enumerate(TOPICS * 6)]


class PrintableOnly(LogitsProcessor):
    """Only printable ASCII and newlines: the tiny byte tokenizer then round-trips every answer."""

    def __call__(self, input_ids, scores):
        banned = torch.ones(scores.shape[-1], dtype=torch.bool)
        banned[32:127] = False
        banned[10] = False
        return scores.masked_fill(banned, float("-inf"))


def keys_for(names, secret=SECRET):
    return [account_key(secret.encode(), n, PARAMS) for n in names]


@pytest.fixture(scope="module")
def world():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a busy 2-core machine: one thread spins least
    try:
        teacher = load_model("tiny", device="cpu")
        leak_keys = keys_for(LEAKERS)
        half = len(TRAIN_PROMPTS) // 2
        leaked = []
        for key, part in zip(leak_keys, (TRAIN_PROMPTS[:half], TRAIN_PROMPTS[half:])):
            leaked += generate_answers(
                teacher,
                part,
                max_new_tokens=48,
                temperature=1.0,
                seed=len(leaked),
                logits_processors=[WatermarkLogitsProcessor(key), PrintableOnly()],
                progress=False,
            )
        clean = generate_answers(
            teacher,
            TRAIN_PROMPTS,
            max_new_tokens=48,
            temperature=1.0,
            seed=7,
            logits_processors=[PrintableOnly()],
            progress=False,
        )
        untrained = load_model("tiny:seed=1", device="cpu")
        yield {
            "teacher": teacher,
            "untrained": untrained,
            "leaked_answers": leaked,
            "clean_answers": clean,
            "leaked": sft(untrained, TRAIN_PROMPTS, leaked),
            "clean": sft(untrained, TRAIN_PROMPTS, clean),
        }
    finally:
        torch.set_num_threads(threads)


def own_answers(lm, seed=0):
    return generate_answers(
        lm, EVAL_PROMPTS, max_new_tokens=48, temperature=0.7, seed=seed, progress=False
    )


# ---- the statistics on synthetic data -----------------------------------------------------------


def test_chernoff_bound_is_a_valid_p_value_and_close_to_exact():
    gamma = 0.25
    # Equal weights: a bound on the exact binomial tail, within the usual factor.
    for n, k in [(200, 70), (1000, 300), (50, 50)]:
        exact = float(binom.logsf(k - 1, n, gamma))
        bound = chernoff_log_p(k, np.ones(n), gamma)
        assert bound >= exact - 1e-9
        assert bound - exact < math.log(20 * math.sqrt(n))
    assert chernoff_log_p(30, np.ones(200), gamma) == 0.0  # at or below the mean
    assert chernoff_log_p(10, np.ones(10), gamma) == pytest.approx(10 * math.log(gamma))
    # Peaked, uneven weights (like a student's distribution): simulate the null and check that
    # P(p <= a) <= a, and that the test is not uselessly conservative.
    rng = np.random.default_rng(0)
    weights = rng.dirichlet(np.full(8, 0.3), size=60).ravel()  # 60 contexts x top-8 probabilities
    sims = 4000
    green = rng.random((sims, weights.size)) < gamma
    scores = green.astype(float) @ weights
    pvals = np.exp([chernoff_log_p(s, weights, gamma) for s in scores])
    for a in (0.01, 0.05, 0.2):
        assert (pvals <= a).mean() <= a
    assert (pvals <= 0.2).mean() > 0.02


def test_open_test_rejects_bad_input(world):
    with pytest.raises(ConfigError, match="one prompt per answer"):
        open_test(world["teacher"], keys_for(["a"]), ["x", "y"], prompts=["p"], progress=False)
    with pytest.raises(ConfigError, match="no keys"):
        open_test(world["teacher"], [], ["some text"], progress=False)
    mixed = [
        account_key(b"s", "a", PARAMS),
        account_key(b"s", "b", WatermarkParams(delta=4.0, gamma=0.5)),
    ]
    with pytest.raises(ConfigError, match="one scheme"):
        open_test(world["teacher"], mixed, ["some text"], progress=False)


# ---- truth known both ways -----------------------------------------------------------------------


def test_training_data_carries_both_leakers_watermarks(world):
    # Sanity of the setup: the leaked answers are watermarked, the clean ones are not.
    keys = keys_for(ACCOUNTS)
    assert (
        closed_test(
            keys, world["leaked_answers"], world["teacher"].tokenizer, prompts=TRAIN_PROMPTS
        ).traced
        == LEAKERS
    )
    assert (
        closed_test(
            keys, world["clean_answers"], world["teacher"].tokenizer, prompts=TRAIN_PROMPTS
        ).traced
        == []
    )


def test_open_mode_traces_the_two_leakers_and_spares_clean_models(world):
    keys = keys_for(ACCOUNTS)
    leaked = world["leaked"]
    result = open_test(
        leaked,
        keys,
        own_answers(leaked),
        prompts=EVAL_PROMPTS,
        exclude=EVAL_PROMPTS,
        null_keys=200,
        progress=False,
    )
    assert result.traced == LEAKERS  # exactly the 2 of 20, Holm-corrected
    by = {k.account: k for k in result.keys}
    for name in LEAKERS:
        assert by[name].log10_p < -4
        assert by[name].green_fraction > result.null["green_fraction_mean"] + 0.03
        assert by[name].extra["empirical_p"] == pytest.approx(1 / 201)  # above every wrong key
    assert result.to_dict()["traced"] == LEAKERS and result.scored > 50
    for control in ("teacher", "untrained", "clean"):
        lm = world[control]
        res = open_test(
            lm,
            keys,
            own_answers(lm),
            prompts=EVAL_PROMPTS,
            exclude=EVAL_PROMPTS,
            null_keys=0,
            progress=False,
        )
        assert res.traced == [], control
        assert min(k.p_value for k in res.keys) > 1e-3, control


def test_closed_mode_spares_clean_models(world):
    keys = keys_for(ACCOUNTS)
    for control in ("teacher", "untrained", "clean"):
        lm = world[control]
        res = closed_test(keys, own_answers(lm), lm.tokenizer, prompts=EVAL_PROMPTS)
        assert res.traced == [], control
        assert res.scored > 300


def test_false_positive_rate_across_many_keys(world):
    """On clean models the p-value of a wrong key must be (super-)uniform: check the rate of
    p <= α over 300 keys, for both tests, on every clean control."""
    keys = keys_for([f"other-{i}" for i in range(300)], secret="another secret")
    rates = {}
    for control in ("teacher", "untrained", "clean"):
        lm = world[control]
        answers = own_answers(lm, seed=3)
        opened = open_test(
            lm,
            keys,
            answers,
            prompts=EVAL_PROMPTS,
            exclude=EVAL_PROMPTS,
            null_keys=0,
            progress=False,
        )
        closed = closed_test(keys, answers, lm.tokenizer, prompts=EVAL_PROMPTS)
        for mode, res in (("open", opened), ("closed", closed)):
            p = np.array([k.p_value for k in res.keys])
            for alpha in (0.01, 0.05):
                rate = float((p <= alpha).mean())
                # binomial sampling error over 300 keys (keys share the text, so allow 4 sd)
                assert rate <= alpha + 4 * math.sqrt(alpha * (1 - alpha) / len(keys)), (
                    control,
                    mode,
                    alpha,
                    rate,
                )
                rates[(control, mode, alpha)] = rate
            assert float(p.mean()) > 0.4, (control, mode)  # not piled up near 0
    # ...and the open test is not trivially conservative: some keys land below 0.05 overall
    assert sum(rates[(c, "open", 0.05)] for c in ("teacher", "untrained", "clean")) > 0


def test_closed_mode_over_http_from_the_cli(world, tmp_path):
    """The leaked student behind a real OpenAI-compatible server, tested through its API from the
    CLI (which calls ``closed_radioactivity``): traced to the 2 leakers; the secret never printed."""
    student_dir = tmp_path / "student"
    world["leaked"].model.save_pretrained(student_dir)
    world["leaked"].tokenizer.save_pretrained(student_dir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(EVAL_PROMPTS))
    with server_process(
        "--model", str(student_dir), "--no-guard", "--no-watermark", env=ONE_THREAD
    ) as server:
        out = run_cli(
            "forensics",
            "radioactivity",
            "--suspect",
            server.url + "/v1",
            "--accounts",
            ",".join(ACCOUNTS),
            "--prompts",
            str(prompts),
            "--tokenizer",
            "tiny",
            "--max-tokens",
            "48",
            "--json",
            "--scheme",
            "keyed-hash",
            env={"DISTILLGUARD_WATERMARK_SECRET": SECRET, **ONE_THREAD},
            timeout=300,
        )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert (
        result["mode"] == "closed"
        and result["texts"] == len(EVAL_PROMPTS)
        and result["scored"] > 300
    )
    assert result["traced"] == LEAKERS
    assert SECRET not in out.stdout + out.stderr


def test_cli_open_mode_and_errors(world, tmp_path):
    student_dir = tmp_path / "student"
    world["leaked"].model.save_pretrained(student_dir)
    world["leaked"].tokenizer.save_pretrained(student_dir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(EVAL_PROMPTS))
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    out = run_cli(
        "forensics",
        "radioactivity",
        "--suspect",
        str(student_dir),
        "--secret-file",
        str(secret_file),
        "--accounts",
        ",".join(ACCOUNTS),
        "--prompts",
        str(prompts),
        "--tokenizer",
        "tiny",
        "--max-tokens",
        "48",
        "--null-keys",
        "50",
        "--device",
        "cpu",
        "--scheme",
        "keyed-hash",
        env=ONE_THREAD,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "traced to: acct-03, acct-11" in out.stdout and SECRET not in out.stdout + out.stderr
    bad = run_cli(
        "forensics",
        "radioactivity",
        "--suspect",
        str(student_dir),
        "--mode",
        "closed",
        "--secret",
        "x",
        "--accounts",
        "a",
        env=ONE_THREAD,
    )
    assert (
        bad.returncode == 2
        and "needs the suspect's API URL" in bad.stderr
        and "Traceback" not in bad.stderr
    )


def test_generate_via_api_reports_an_unreachable_suspect():
    from distillguard.forensics import SuspectAPIError, generate_via_api
    from tests.servers import free_port

    with pytest.raises(SuspectAPIError, match="cannot query the suspect"):
        generate_via_api(f"http://127.0.0.1:{free_port()}", ["hi"], model="m", timeout_s=2)
