"""A non-streaming client that hangs up stops its generation, and the ledger says so.

Starlette keeps running a handler whose client went away; without the gateway's watcher the
engine would generate the whole answer for nobody and the ledger would record a 200.
"""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest

from distillguard.models import load_model
from tests.servers import run_cli, serve_process

ADMIN = "admin-" + uuid.uuid4().hex
MODEL = "tiny:ctx=8192"
LONG = 8000  # tokens: tens of seconds of generation for the tiny model


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    db = f"sqlite:///{tmp_path_factory.mktemp('gone') / 'ledger.db'}"
    with serve_process("--model", MODEL, "--db", db, env={"DISTILLGUARD_ADMIN_KEY": ADMIN}) as url:
        yield url, db


def rows(db: str, account: str) -> list[dict]:
    proc = run_cli("ledger", "export", "--db", db, "--account", account)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_hanging_up_stops_generation_and_is_recorded(gateway):
    url, db = gateway
    tok = load_model("tiny", device="cpu").tokenizer
    banned = {str(i): -100 for i in set(tok.all_special_ids) | {tok.eos_token_id}}
    key = httpx.post(f"{url}/admin/keys", json={"account": "quitter"},
                     headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30).json()["key"]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "write forever"}],
            "max_tokens": LONG, "logit_bias": banned}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                   timeout=httpx.Timeout(30, read=1.0))
    deadline = time.monotonic() + 120
    while not (found := rows(db, "quitter")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(found) == 1
    assert found[0]["response"]["status"] == 499  # not a 200 with 8,000 tokens generated for nobody
    # The server is free again: a short request is answered (the long one no longer runs).
    ok = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                    json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert ok.status_code == 200
    assert [r["response"]["status"] for r in rows(db, "quitter")] == [499, 200]
