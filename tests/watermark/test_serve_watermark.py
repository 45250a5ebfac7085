"""End to end: the gateway watermarks each account with its own key; the CLI traces text back to it."""

from __future__ import annotations

import json
import uuid

import httpx
from sqlalchemy import select

from distillguard.guard.db import make_engine
from distillguard.guard.schema import LedgerRow
from distillguard.watermark import WatermarkParams, account_key
from tests.servers import run_cli, serve_process

# Fixed, with the requests' fixed seeds: the same answers and p-values on every run, so acct-b's
# p_holm > 1e-3 does not fail by chance (a fresh secret per run would miss it ~0.1% of runs).
# Written down before any run, not picked among secrets that pass.
SECRET = "test-secret-fixed-0"
ADMIN = "admin-" + uuid.uuid4().hex


def test_responses_carry_the_account_key_and_trace_back(tmp_path):
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    env = {"DISTILLGUARD_WATERMARK_SECRET": SECRET, "DISTILLGUARD_ADMIN_KEY": ADMIN}
    texts: dict[str, list[str]] = {"acct-a": [], "acct-b": []}
    with serve_process(
        "--model",
        "tiny",
        "--db",
        db,
        "--watermark-scheme",
        "keyed-hash",
        "--watermark-delta",
        "4",
        env=env,
    ) as url:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        keys = {
            a: httpx.post(f"{url}/admin/keys", json={"account": a}, headers=admin).json()["key"]
            for a in texts
        }
        for account, key in keys.items():
            for i in range(6):
                body = {
                    "model": "tiny",
                    "messages": [{"role": "user", "content": f"tell me {i}"}],
                    "max_tokens": 80,
                    "seed": i,
                    "logprobs": True,
                    "top_logprobs": 3,
                    "stream": i % 2 == 1,
                }
                r = httpx.post(
                    f"{url}/v1/chat/completions",
                    json=body,
                    headers={"Authorization": f"Bearer {key}"},
                    timeout=60,
                )
                assert r.status_code == 200
                if i % 2 == 0:
                    choice = r.json()["choices"][0]
                    # logprobs are those of the watermarked distribution actually sampled
                    for entry in choice["logprobs"]["content"]:
                        assert entry["logprob"] <= 0
                    texts[account].append(choice["message"]["content"])
    params = WatermarkParams(delta=4)
    engine = make_engine(db)
    with engine.connect() as conn:
        marks = {(r.account_id, r.watermark_key_id) for r in conn.execute(select(LedgerRow))}
    engine.dispose()
    assert marks == {(a, account_key(SECRET.encode(), a, params).key_id) for a in texts}
    assert all(SECRET not in (k or "") for _, k in marks)

    out = tmp_path / "a.jsonl"
    assert (
        run_cli("ledger", "export", "--db", db, "--account", "acct-a", "-o", str(out)).returncode
        == 0
    )
    detect = run_cli(
        "watermark",
        "detect",
        "--file",
        str(out),
        "--accounts",
        "acct-a,acct-b,acct-c",
        "--scheme",
        "keyed-hash",
        "--model",
        "tiny",
        "--json",
        env={"DISTILLGUARD_WATERMARK_SECRET": SECRET},
    )
    assert detect.returncode == 0, detect.stderr
    result = json.loads(detect.stdout)
    assert result["traced"] == ["acct-a"]
    by_account = {k["account"]: k for k in result["keys"]}
    assert by_account["acct-a"]["p_holm"] < 1e-3 and by_account["acct-b"]["p_holm"] > 1e-3
    assert by_account["acct-a"]["scored"] > 100

    # Entropy-aware: the teacher re-reads each answer after the request's messages (from the
    # ledger's records) and weights the pairs; the same verdict. (The tiny random model is
    # unsure everywhere, so the weights are near-uniform here: the gain in power is measured
    # on the real teacher in bench/watermark_quality.py.)
    aware = run_cli(
        "watermark",
        "detect",
        "--file",
        str(out),
        "--accounts",
        "acct-a,acct-b,acct-c",
        "--scheme",
        "keyed-hash",
        "--teacher",
        "tiny",
        "--delta",
        "4",
        "--json",
        env={"DISTILLGUARD_WATERMARK_SECRET": SECRET},
    )
    assert aware.returncode == 0, aware.stderr
    aware_result = json.loads(aware.stdout)
    assert aware_result["detector"] == "teacher-llr" and aware_result["traced"] == ["acct-a"]
    aware_keys = {k["account"]: k for k in aware_result["keys"]}
    assert aware_keys["acct-a"]["p_holm"] < 1e-3 and aware_keys["acct-b"]["p_holm"] > 1e-3
    assert aware_keys["acct-a"]["scored"] > 100

    # The same texts, tokenised in-process, fail under the wrong secret: the key is the secret.
    wrong = run_cli(
        "watermark",
        "detect",
        "--file",
        str(out),
        "--account",
        "acct-a",
        "--scheme",
        "keyed-hash",
        "--model",
        "tiny",
        "--json",
        env={"DISTILLGUARD_WATERMARK_SECRET": "not-the-secret"},
    )
    assert json.loads(wrong.stdout)["traced"] == []
