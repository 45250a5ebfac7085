"""The default ladder gathers evidence before anyone is cut off (issue 28).

A real gateway (tiny model, SQLite ledger) with online detection calibrated, in this test, on
benign arena traffic (ShareGPT users from the calibration pool) and NO ``--policy``: the default
ladder. A scripted harvester is flagged, escalates to ``suspect`` and then ``extracting``, and is
still served: some of its answers are canaries, recorded in the ledger, and
``distillguard forensics canaries`` finds them there. Before this change the default
``extracting`` level blocked, its 403 came before any canary, and the command said "the ledger
holds no canary answers". A person chatting beside it is never flagged.

Detectors without embeddings keep the test fast (as tests/guard/test_online.py); the embedding
detectors go through the same monitor code. ``--extracting-after 5`` (a serve option, not the
ladder) shortens the wait between ``suspect`` and ``extracting`` from the default 100 requests.
"""

from __future__ import annotations

import json
import time
import uuid
from types import SimpleNamespace

import httpx
import pytest
from sqlalchemy import create_engine, select

from distillguard.guard.canary import canary_text
from distillguard.guard.schema import LedgerRow
from tests.servers import run_cli, serve_process

ADMIN = "admin-" + uuid.uuid4().hex
SECRET = "default-ladder-test-secret"
# the detectors of the FPR evaluations (docs/detection-evaluation.md): all but the embedding ones
NO_EMBEDDINGS = ("volume", "timing", "shape", "template", "cot", "fresh", "linking")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    from distillguard.arena.traffic import TrafficConfig, generate_traffic
    from distillguard.detect import DetectConfig, calibrate

    root = tmp_path_factory.mktemp("default-ladder")
    benign = generate_traffic(
        TrafficConfig(benign_accounts=300, pool="calibration", days=2, seed=3, model="tiny")
    )
    assert {r["label"] for r in benign} == {"benign"}
    calibration = calibrate(benign, config=DetectConfig(target_fpr=0.01, detectors=NO_EMBEDDINGS))
    calibration.save(root / "cal.npz")
    db = f"sqlite:///{root / 'ledger.db'}"
    env = {
        "DISTILLGUARD_ADMIN_KEY": ADMIN,
        "DISTILLGUARD_WATERMARK_SECRET": SECRET,
        "DISTILLGUARD_VERDICT_CACHE_TTL_S": "0",
    }
    with serve_process(
        "--model",
        "tiny",
        "--db",
        db,
        "--detect",
        str(root / "cal.npz"),
        "--extracting-after",
        "5",
        env=env,
        timeout_s=300,
    ) as url:
        yield SimpleNamespace(url=url, db=db, env=env)


def admin(gw, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(
        method, gw.url + path, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30, **kw
    )


def new_key(gw, account: str, **limits) -> str:
    resp = admin(gw, "POST", "/admin/keys", json={"account": account, **limits})
    assert resp.status_code == 201, resp.text
    return resp.json()["key"]


def ledger_rows(db: str, account: str) -> list:
    engine = create_engine(db)
    try:
        with engine.connect() as conn:
            return list(
                conn.execute(
                    select(
                        LedgerRow.request_id,
                        LedgerRow.status,
                        LedgerRow.policy_action,
                        LedgerRow.response_text,
                    )
                    .where(LedgerRow.account_id == account)
                    .order_by(LedgerRow.id)
                )
            )
    finally:
        engine.dispose()


def test_an_extractor_is_served_canaries_under_the_default_ladder(gateway):
    # a customer with high limits on its key and account: throttled, it gets a quarter of them
    # (an account without limits gets throttle_rpm, 6 a minute, which would make this test slow)
    limits = {"rpm": 20_000, "tpm": 2_000_000}
    harvester = new_key(gateway, "acme-labs", **limits)
    assert admin(gateway, "PUT", "/admin/accounts/acme-labs/limits", json=limits).is_success
    person = new_key(gateway, "bystander")
    with httpx.Client(base_url=gateway.url, timeout=60) as http:

        def ask(key: str, messages: list[dict], **params) -> httpx.Response:
            return http.post(
                "/v1/chat/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={"model": "tiny", "messages": messages, "max_tokens": 2, **params},
            )

        history: list[dict] = []
        for turn in ("how do I repot a fern?", "and how often should I water it?"):
            history.append({"role": "user", "content": turn})
            r = ask(person, history)
            assert r.status_code == 200
            history.append(
                {"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]}
            )

        # a script: a single-turn sweep, top_logprobs=20, greedy, as fast as it can; it goes on
        # until three of its answers were canaries (10% of answers at 'extracting'), at most 600
        statuses = []
        for i in range(600):
            r = ask(
                harvester,
                [{"role": "user", "content": f"Explain topic {i} step by step."}],
                logprobs=True,
                top_logprobs=20,
                temperature=0,
            )
            statuses.append(r.status_code)
            assert r.status_code in (200, 429), r.text  # never 403: nothing blocks by default
            if i % 20 == 19:
                rows = ledger_rows(gateway.db, "acme-labs")
                if sum("canary" in (row.policy_action or "") for row in rows) >= 3:
                    break
        time.sleep(0.5)  # the monitor thread works behind the requests
        verdicts = admin(gateway, "GET", "/admin/verdicts").json()["data"]

    by_account: dict[str, list[dict]] = {}
    for v in verdicts:
        by_account.setdefault(v["account_id"], []).append(v)
    levels = [v["level"] for v in by_account["acme-labs"]]  # newest first; each an escalation
    assert levels[:2] == ["extracting", "suspect"] and levels[2:] in ([], ["watch"]), levels
    assert all(v["source"] == "online" and v["reasons"] for v in by_account["acme-labs"])
    assert "bystander" not in by_account  # never flagged

    rows = ledger_rows(gateway.db, "acme-labs")
    actions = [row.policy_action or "" for row in rows]
    first_suspect = next(i for i, a in enumerate(actions) if a.startswith("suspect:"))
    first_extracting = next(i for i, a in enumerate(actions) if a.startswith("extracting:"))
    assert 0 < first_suspect < first_extracting
    # once flagged, the ladder only climbs, and the suspect's countermeasures stay on
    assert all(a.startswith(("suspect:", "extracting:")) for a in actions[first_suspect:])
    assert all("throttle" in a and "watermark_boost" in a for a in actions[first_suspect:])
    canaries = [row for row in rows if "canary" in (row.policy_action or "")]
    assert len(canaries) >= 3 and all(row.status == 200 for row in canaries)
    assert all(row.policy_action.startswith("extracting:") for row in canaries)
    # each is the account's own canary for that request, recomputable from the secret
    for row in canaries:
        assert row.response_text == canary_text(SECRET.encode(), "acme-labs", row.request_id)
    print(
        f"acme-labs: suspect at request {first_suspect + 1}, extracting at "
        f"{first_extracting + 1}, {len(canaries)} canaries in {len(rows)} requests "
        f"({statuses.count(429)} throttled)"
    )

    # the investigator's command finds them (the tiny random model as the suspect: a control
    # that learned nothing, so nothing is traced; the test on a trained student is elsewhere)
    out = run_cli(
        "forensics",
        "canaries",
        "--suspect",
        "tiny",
        "--db",
        gateway.db,
        "--decoys",
        "9",
        "--json",
        env={"DISTILLGUARD_WATERMARK_SECRET": SECRET},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert [(a["account"], a["canaries"]) for a in result["accounts"]] == [
        ("acme-labs", len(canaries))
    ]
    assert result["traced"] == []


def test_an_empty_ledger_says_when_canaries_are_served(tmp_path):
    out = run_cli(
        "forensics",
        "canaries",
        "--suspect",
        "tiny",
        "--db",
        f"sqlite:///{tmp_path / 'empty.db'}",
        env={"DISTILLGUARD_WATERMARK_SECRET": SECRET},
    )
    assert out.returncode == 2
    message = " ".join(out.stderr.split())
    assert "the ledger holds no canary answers" in message
    assert "accounts at 'extracting' (the default ladder" in message, message
