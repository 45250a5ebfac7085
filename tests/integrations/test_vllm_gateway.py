"""The gateway drives the vLLM plugin: ``distillguard serve --upstream URL --upstream-engine vllm``
in front of the session's real vLLM server. Each account's answers carry its own watermark key
(the ledger records its id, never the secret), and the investigator's CLI traces an account's
ledger export to that account alone; a client cannot send ``vllm_xargs`` (or any other vLLM
field) to change or remove the watermark."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from sqlalchemy import select

from distillguard.guard.db import make_engine
from distillguard.guard.schema import LedgerRow
from distillguard.watermark import WatermarkParams, account_key
from tests.integrations.conftest import SERVED_NAME
from tests.integrations.test_vllm_server import PROMPTS
from tests.servers import run_cli, serve_process

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

SECRET = "vllm-gateway-test-secret-0"  # fixed, written down before any run
ADMIN = "admin-" + uuid.uuid4().hex
ACCOUNTS = ["acct-a", "acct-b"]


def test_gateway_watermarks_each_account_through_vllm_and_traces_it(vllm_server, tmp_path):
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    env = {"DISTILLGUARD_WATERMARK_SECRET": SECRET, "DISTILLGUARD_ADMIN_KEY": ADMIN}
    with serve_process(
        "--upstream", vllm_server, "--upstream-engine", "vllm", "--db", db, env=env
    ) as url:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        keys = {
            a: httpx.post(f"{url}/admin/keys", json={"account": a}, headers=admin).json()["key"]
            for a in ACCOUNTS
        }
        clients = {
            a: openai.OpenAI(base_url=f"{url}/v1", api_key=k, max_retries=0, timeout=600)
            for a, k in keys.items()
        }

        def ask(account, i):
            kw = dict(
                model=SERVED_NAME,
                messages=[{"role": "user", "content": PROMPTS[i]}],
                max_tokens=64,
                temperature=0.7,
                seed=i,
            )
            if i % 2:  # streamed answers go through the same path
                chunks = clients[account].chat.completions.create(stream=True, **kw)
                return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            return clients[account].chat.completions.create(**kw).choices[0].message.content

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(ask, a, i) for a in ACCOUNTS for i in range(len(PROMPTS))]
            answers = [f.result() for f in futures]
        assert all(answers)

        # A client's vllm_xargs (to drop or swap the key) never reaches vLLM: refused, 400.
        for xargs in ({"distillguard": "{}"}, {"distillguard": None}, {"other": 1}):
            with pytest.raises(openai.BadRequestError) as err:
                clients["acct-a"].chat.completions.create(
                    model=SERVED_NAME,
                    messages=[{"role": "user", "content": "hi"}],
                    max_tokens=4,
                    extra_body={"vllm_xargs": xargs},
                )
            assert err.value.body["code"] == "unknown_parameter"
        for c in clients.values():
            c.close()

    params = WatermarkParams()
    engine = make_engine(db)
    with engine.connect() as conn:
        rows = list(conn.execute(select(LedgerRow)))
    engine.dispose()
    served = {(r.account_id, r.watermark_key_id) for r in rows if r.status == 200}
    assert served == {(a, account_key(SECRET.encode(), a, params).key_id) for a in ACCOUNTS}

    for account in ACCOUNTS:
        out = tmp_path / f"{account}.jsonl"
        exported = run_cli("ledger", "export", "--db", db, "--account", account, "-o", str(out))
        assert exported.returncode == 0, exported.stderr
        detect = run_cli(
            "watermark",
            "detect",
            "--file",
            str(out),
            "--accounts",
            "acct-a,acct-b,acct-c",
            "--model",
            "smollm2",
            "--json",
            env={"DISTILLGUARD_WATERMARK_SECRET": SECRET},
            timeout=600,
        )
        assert detect.returncode == 0, detect.stderr
        result = json.loads(detect.stdout)
        # A's answers traced to A alone, B's to B alone (so not to A)
        assert result["traced"] == [account], result
