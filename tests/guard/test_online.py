"""Online detection in a real gateway: a calibrated ``AccountMonitor`` scores every finished
request off the request path, and its verdicts move accounts up the policy ladder.

The calibration uses the detectors that need no embeddings (volume, timing, request shape,
linking) on small synthetic benign traffic, to keep the test fast; the embedding detectors go
through the same monitor code (tests/detect)."""

from __future__ import annotations

import json
import random
import time
import uuid
from types import SimpleNamespace

import httpx
import pytest

from distillguard.guard.online import OnlineDetection
from distillguard.guard.policy import Level
from tests.detect.synth import benign_account
from tests.servers import serve_process

ADMIN = "admin-" + uuid.uuid4().hex
NO_EMBEDDINGS = ("volume", "timing", "shape", "linking")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    from distillguard.detect import DetectConfig, calibrate

    root = tmp_path_factory.mktemp("online")
    rng = random.Random(11)
    benign = [r for i in range(600) for r in benign_account(rng, f"b{i}", days=rng.randint(1, 3))]
    calibration = calibrate(benign, config=DetectConfig(target_fpr=0.01, detectors=NO_EMBEDDINGS))
    calibration.save(root / "cal.npz")
    policy = root / "policy.yaml"
    policy.write_text(
        json.dumps(
            {
                "ladder": {
                    "watch": ["log"],
                    "suspect": ["log", "limit_logprobs"],
                    "extracting": ["block"],
                }
            }
        )
    )
    env = {"DISTILLGUARD_ADMIN_KEY": ADMIN, "DISTILLGUARD_VERDICT_CACHE_TTL_S": "0"}
    with serve_process(
        "--model",
        "tiny",
        "--db",
        f"sqlite:///{root / 'ledger.db'}",
        "--policy",
        str(policy),
        "--detect",
        str(root / "cal.npz"),
        "--extracting-after",
        "5",
        env=env,
        timeout_s=300,
    ) as url:
        yield SimpleNamespace(url=url)


def admin(gw, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(
        method, gw.url + path, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30, **kw
    )


def new_key(gw, account: str) -> str:
    resp = admin(gw, "POST", "/admin/keys", json={"account": account})
    assert resp.status_code == 201, resp.text
    return resp.json()["key"]


def test_a_scripted_harvester_is_flagged_then_blocked_while_a_person_is_not(gateway):
    harvester, person = new_key(gateway, "harvester"), new_key(gateway, "person")
    with httpx.Client(base_url=gateway.url, timeout=60) as http:

        def ask(key: str, messages: list[dict], **params) -> httpx.Response:
            return http.post(
                "/v1/chat/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={"model": "tiny", "messages": messages, "max_tokens": 2, **params},
            )

        # a person: one conversation with follow-ups, a few requests
        history: list[dict] = []
        for turn in (
            "how do I repot a fern?",
            "and how often should I water it?",
            "thanks! what soil?",
        ):
            history.append({"role": "user", "content": turn})
            r = ask(person, history)
            assert r.status_code == 200
            history.append(
                {"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]}
            )

        # a script: single-turn sweep over topics, top_logprobs=20, greedy, as fast as it can
        statuses, stripped_at = [], None
        for i in range(400):
            r = ask(
                harvester,
                [{"role": "user", "content": f"Explain topic {i} step by step."}],
                logprobs=True,
                top_logprobs=20,
                temperature=0,
            )
            statuses.append(r.status_code)
            if r.status_code == 403:
                break
            if stripped_at is None and r.json()["choices"][0]["logprobs"] is None:
                stripped_at = i + 1
        assert stripped_at is not None, "the harvester was never limited"
        assert statuses[-1] == 403 and r.json()["error"]["code"] == "account_blocked"

        time.sleep(0.5)
        verdicts = admin(gateway, "GET", "/admin/verdicts").json()["data"]
    by_account = {}
    for v in verdicts:
        by_account.setdefault(v["account_id"], []).append(v)
    levels = [v["level"] for v in by_account["harvester"]]  # newest first; each an escalation
    assert levels[:2] == ["extracting", "suspect"] and levels[2:] in ([], ["watch"])
    assert all(v["source"] == "online" and v["reasons"] for v in by_account["harvester"])
    assert "person" not in by_account  # never flagged
    print(f"harvester limited after {stripped_at} requests, blocked after {len(statuses)}")


class _Scripted:
    """A monitor replaying given detector verdicts (tests the level mapping, not detection)."""

    def __init__(self, levels):
        self.levels = iter(levels)

    def observe_batch(self, records):
        return [
            SimpleNamespace(
                account=r["account"],
                level=next(self.levels),
                score=1.0,
                reasons=("r",),
                cluster=None,
            )
            for r in records
        ]


def test_flags_become_suspect_then_extracting_after_n_more():
    online = OnlineDetection(
        _Scripted(["ok", "watch", "flag", "flag", "flag", "flag"]), extracting_after=2
    )
    got = [online.observe({"account": "a"}) for _ in range(6)]
    assert got[0] is None
    assert [v.level for v in got[1:]] == [
        Level.WATCH,
        Level.SUSPECT,
        Level.SUSPECT,
        Level.EXTRACTING,
        Level.EXTRACTING,
    ]
    assert got[4].reasons[0].startswith("still flagged 2 requests")
