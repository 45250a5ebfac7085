"""The time rule as a server option (issue 23): ``serve --extracting-after-s`` reaches the ladder of
a real gateway, and bad values are refused at the command line.

A flagged account that is flagged again ``--extracting-after-s`` seconds after its first flag is
``extracting`` however few its flagged requests: a low-and-slow distiller never sends
``--extracting-after`` of them. Here the rule is 2 s and the count 1,000, so only the rule can
take the harvester there. The lone low-and-slow account itself, on arena traffic, is in
tests/guard/test_cluster_escalation.py; the measurement behind the default in
bench/ladder_false_positives.py."""

from __future__ import annotations

import json
import random
import time
import uuid

import httpx
import pytest
from pydantic import ValidationError

from distillguard.cli.options import seconds_or_off
from distillguard.errors import ConfigError
from distillguard.guard.config import GuardConfig
from distillguard.guard.online import OnlineDetection
from tests.detect.synth import benign_account
from tests.servers import run_cli, server_process

ADMIN = "admin-" + uuid.uuid4().hex
NO_EMBEDDINGS = ("volume", "timing", "shape", "linking")
RULE_S = 2.0


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    from distillguard.detect import DetectConfig, calibrate

    root = tmp_path_factory.mktemp("time-rule")
    rng = random.Random(11)
    benign = [r for i in range(600) for r in benign_account(rng, f"b{i}", days=rng.randint(1, 3))]
    calibration = calibrate(benign, config=DetectConfig(target_fpr=0.01, detectors=NO_EMBEDDINGS))
    calibration.save(root / "cal.npz")
    policy = root / "policy.yaml"  # suspect strips logprobs, extracting refuses: both visible
    policy.write_text(
        json.dumps(
            {
                "ladder": {
                    "watch": ["log"],
                    "suspect": ["log", "limit_logprobs"],
                    "extracting": ["log", "block"],
                }
            }
        )
    )
    env = {"DISTILLGUARD_ADMIN_KEY": ADMIN, "DISTILLGUARD_VERDICT_CACHE_TTL_S": "0"}
    with server_process(
        "--model",
        "tiny",
        "--db",
        f"sqlite:///{root / 'ledger.db'}",
        "--policy",
        str(policy),
        "--detect",
        str(root / "cal.npz"),
        "--extracting-after",
        "1000",
        "--extracting-after-s",
        str(RULE_S),
        env=env,
        timeout_s=300,
    ) as server:
        yield server


def test_the_flag_reaches_the_gateways_ladder(gateway):
    # the start-up line says which rule runs
    assert f"or when flagged again {RULE_S:g} s after its first flag" in gateway.log_tail()
    auth = {"Authorization": f"Bearer {ADMIN}"}
    key = httpx.post(
        gateway.url + "/admin/keys", headers=auth, json={"account": "slow"}, timeout=30
    ).json()["key"]
    statuses, suspect_at = [], None
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        for i in range(300):
            if suspect_at is not None and len(statuses) == suspect_at:
                time.sleep(RULE_S + 0.5)  # flagged again, later than the rule, at the next request
            r = http.post(
                "/v1/chat/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={
                    "model": "tiny",
                    "messages": [{"role": "user", "content": f"Explain topic {i} step by step."}],
                    "max_tokens": 2,
                    "logprobs": True,
                    "top_logprobs": 20,
                    "temperature": 0,
                },
            )
            statuses.append(r.status_code)
            if r.status_code == 403:
                break
            if suspect_at is None and r.json()["choices"][0]["logprobs"] is None:
                suspect_at = len(statuses)
    assert suspect_at is not None, "never flagged"
    assert statuses[-1] == 403 and r.json()["error"]["code"] == "account_blocked", statuses[-5:]
    # far fewer than --extracting-after requests in all: the time rule did it, and says so
    assert len(statuses) < 1000
    time.sleep(0.5)
    verdicts = httpx.get(gateway.url + "/admin/verdicts", headers=auth, timeout=30).json()["data"]
    (extracting,) = [
        v for v in verdicts if v["account_id"] == "slow" and v["level"] == "extracting"
    ]
    why = extracting["reasons"][0]
    assert why.startswith("flagged again ") and why.endswith(" s after its first flag"), why
    assert float(why.split()[2]) >= RULE_S, why


@pytest.mark.parametrize("command", ["serve", "monitor"])
@pytest.mark.parametrize("value", ["0", "-5", "soon"])
def test_a_bad_value_is_refused_naming_the_option(command, value, tmp_path):
    args = (
        ["-c", str(tmp_path / "cal.npz"), "--state", str(tmp_path)] if command == "monitor" else []
    )
    done = run_cli(command, *args, f"--extracting-after-s={value}", env={"COLUMNS": "240"})
    said = " ".join(done.stderr.replace("│", " ").split())  # the message without its box
    assert done.returncode == 2, said
    assert f"Invalid value for '--extracting-after-s': {value!r}: give" in said, said
    assert "seconds (43200 is 12 h)" in said and "'off'" in said, said


def test_off_switches_the_rule_off():
    assert seconds_or_off("off") is None and seconds_or_off(" OFF ") is None
    assert seconds_or_off("43200") == 43200.0
    assert GuardConfig(extracting_after_s=None).extracting_after_s is None


def test_the_library_refuses_the_same_values():
    for bad in (0, -5.0):
        with pytest.raises(ValidationError, match="greater than 0"):
            GuardConfig(extracting_after_s=bad)
        with pytest.raises(ConfigError, match=f"extracting_after_s={bad}"):
            OnlineDetection(None, extracting_after_s=bad)
