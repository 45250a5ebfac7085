"""A ledger export says what the policy ladder did to each request, and `watermark detect` does
not score canaries as watermark evidence (issue 28).

A real gateway (tiny model, keyed-hash watermark, SQLite ledger, the default ladder with a higher
``canary_rate`` so a few requests serve several canaries) with an account put at ``extracting``
through the admin API, as an admin or the online monitor would. Its canaries are the gateway's
fabricated sentences, never sampled under the account's watermark: scored, they would dilute the
evidence against the extractor, and count as evidence of nothing. Before this change the export
had no ``policy_action``, so nothing could tell them apart and ``watermark detect`` scored them.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter

import httpx
from sqlalchemy import create_engine, select

from distillguard.guard.schema import LedgerRow
from tests.servers import run_cli, serve_process

ADMIN = "admin-" + uuid.uuid4().hex
SECRET = "test-secret-fixed-0"
MODEL = "tiny:ctx=8192"
LIMITS = {"rpm": 20_000, "tpm": 2_000_000}  # throttled at 'extracting': a quarter is plenty


def _admin(url: str, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(
        method, url + path, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30, **kw
    )


def _detect(*args: str) -> object:
    return run_cli(
        "watermark",
        "detect",
        *args,
        "--scheme",
        "keyed-hash",
        "--model",
        "tiny",
        env={"DISTILLGUARD_WATERMARK_SECRET": SECRET, "COLUMNS": "400"},
        timeout=600,  # loads the tokenizer; a loaded CI machine is slow
    )


def test_an_export_marks_canaries_and_watermark_detect_skips_them(tmp_path):
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    policy = tmp_path / "policy.yaml"
    policy.write_text("canary_rate: 0.5\n")  # the default ladder, half the answers canaries
    env = {
        "DISTILLGUARD_WATERMARK_SECRET": SECRET,
        "DISTILLGUARD_ADMIN_KEY": ADMIN,
        "DISTILLGUARD_VERDICT_CACHE_TTL_S": "0",
    }
    wm = ("--watermark-scheme", "keyed-hash", "--watermark-delta", "4")
    with serve_process("--model", MODEL, "--db", db, "--policy", str(policy), *wm, env=env) as url:
        keys = {}
        for account in ("acme", "bystander"):
            r = _admin(url, "POST", "/admin/keys", json={"account": account, **LIMITS})
            assert r.status_code == 201, r.text
            keys[account] = r.json()["key"]
            assert _admin(url, "PUT", f"/admin/accounts/{account}/limits", json=LIMITS).is_success
        r = _admin(
            url,
            "POST",
            "/admin/accounts/acme/verdict",
            json={"level": "extracting", "reasons": ["t"]},
        )
        assert r.status_code == 201, r.text
        for account, n in (("acme", 16), ("bystander", 2)):
            for i in range(n):
                r = httpx.post(
                    f"{url}/v1/chat/completions",
                    json={
                        "model": MODEL,
                        "messages": [{"role": "user", "content": f"tell me {i}"}],
                        "max_tokens": 40,
                        "seed": i,
                    },
                    headers={"Authorization": f"Bearer {keys[account]}"},
                    timeout=60,
                )
                assert r.status_code == 200, r.text

    engine = create_engine(db)
    try:
        with engine.connect() as conn:
            ledger = list(  # in the export's order
                conn.execute(
                    select(LedgerRow.account_id, LedgerRow.policy_action).order_by(
                        LedgerRow.ts, LedgerRow.id
                    )
                )
            )
    finally:
        engine.dispose()
    served = Counter("canary" in (row.policy_action or "") for row in ledger)
    # 16 requests at rate 0.5 (by request id): both kinds, all but certainly (2 * 2**-16)
    assert served[True] >= 1 and served[False] >= 1, served

    out = tmp_path / "all.jsonl"
    proc = run_cli("ledger", "export", "--db", db, "-o", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["account"] for r in rows] == [row.account_id for row in ledger]
    for r, row in zip(rows, ledger):  # every row carries the ledger's policy_action
        assert r["response"].get("policy_action") == row.policy_action
        assert r["response"].get("canary", False) == ("canary" in (row.policy_action or ""))
        # acme's rows all at 'extracting'; the bystander's at 'ok', which records no action
        assert (row.policy_action or "").startswith("extracting:") == (r["account"] == "acme")
    canaries = sum(bool(r["response"].get("canary")) for r in rows)
    assert canaries == served[True]

    # Parquet and a ledger import of the export, in-process (the CLI's own calls; the CLI paths
    # are tested in tests/detect/test_cli.py): the same records, policy_action included
    from distillguard.detect.parquet import read_traffic, write_traffic
    from distillguard.guard.db import make_engine, migrate
    from distillguard.guard.ledger import import_traffic, iter_traffic

    pq = tmp_path / "all.parquet"
    engine = make_engine(db)
    try:
        write_traffic(iter_traffic(engine), pq)
    finally:
        engine.dispose()
    assert list(read_traffic(pq)) == rows
    copy = make_engine(f"sqlite:///{tmp_path / 'copy.db'}")
    try:
        migrate(copy)
        with open(out, "rb") as fh:
            import_traffic(copy, fh)
        assert list(iter_traffic(copy)) == rows
    finally:
        copy.dispose()

    detect = _detect("-f", str(out), "--accounts", "acme,bystander", "--json")
    assert detect.returncode == 0, detect.stderr
    said = " ".join(detect.stderr.split())
    assert (
        f"skipped {canaries} rows whose answer was not the model's watermarked text: "
        f"{canaries} canary (a canary is the gateway's fabricated answer" in said
    ), said
    result = json.loads(detect.stdout)
    assert result["skipped"] == {"canary": canaries}
    assert "acme" in result["traced"]  # (the bystander's answers carry its own key)

    # the reader takes the Parquet export alike, and a file of canaries only has nothing to test
    from distillguard.cli.watermark import read_records

    from_jsonl, from_parquet = Counter(), Counter()
    assert read_records(str(pq), from_parquet) == read_records(str(out), from_jsonl)
    assert from_parquet == from_jsonl == {"canary": canaries}
    only = tmp_path / "canaries.jsonl"
    only.write_text("".join(json.dumps(r) + "\n" for r in rows if r["response"].get("canary")))
    skipped = Counter()
    assert read_records(str(only), skipped) == [] and skipped == {"canary": canaries}
