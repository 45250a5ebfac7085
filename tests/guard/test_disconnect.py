"""A non-streaming client that hangs up stops its generation, and the ledger says so.

Starlette keeps running a handler whose client went away; without the gateway's watcher the
engine would generate the whole answer for nobody and the ledger would record a 200.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import httpx
import pytest

from distillguard.guard.gateway import Guard, GuardConfig, RequestLog
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
    key = make_key(url, "quitter")
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "write forever"}],
        "max_tokens": LONG,
        "logit_bias": banned,
    }
    warm = make_key(
        url, "warmup"
    )  # a fresh server's first forward passes are slow: not in the second below
    assert (
        httpx.post(
            f"{url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {warm}"},
            timeout=60,
            json={**body, "max_tokens": 4},
        ).status_code
        == 200
    )
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{url}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=httpx.Timeout(30, read=2.0),
        )
    deadline = time.monotonic() + 120
    while not (found := rows(db, "quitter")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(found) == 1
    assert found[0]["response"]["status"] == 499  # not a 200 with 8,000 tokens generated for nobody
    # Charged for the tokens generated before it hung up (about a second's worth), not for none.
    usage = found[0]["response"]["usage"]
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] < LONG
    own = httpx.get(
        f"{url}/v1/usage", headers={"Authorization": f"Bearer {key}"}, timeout=30
    ).json()
    assert own["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert own["keys"][0]["live"]["tokens_today"] == own["total_tokens"]
    # The server is free again: a short request is answered (the long one no longer runs).
    ok = httpx.post(
        f"{url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    )
    assert ok.status_code == 200
    assert [r["response"]["status"] for r in rows(db, "quitter")] == [499, 200]


def make_key(url: str, account: str, **limits) -> str:
    resp = httpx.post(
        f"{url}/admin/keys",
        json={"account": account, **limits},
        headers={"Authorization": f"Bearer {ADMIN}"},
        timeout=30,
    )
    assert resp.status_code == 201, resp.text
    return resp.json()["key"]


def wait_rows(db: str, account: str, n: int) -> list[dict]:
    deadline = time.monotonic() + 60
    while len(found := rows(db, account)) < n and time.monotonic() < deadline:
        time.sleep(0.3)
    assert len(found) == n
    return found


def test_stream_hung_up_after_k_tokens_is_charged_k_tokens(gateway):
    """Issue 24 #2: a client that closes a stream early was charged nothing (row 499, NULL
    tokens, tokens_today 0): hanging up a token before the end escaped every limit."""
    url, db = gateway
    tok = load_model("tiny", device="cpu").tokenizer
    banned = {str(i): -100 for i in set(tok.all_special_ids) | {tok.eos_token_id}}
    key = make_key(url, "hangup", tpm=100_000, daily_tokens=100_000)
    headers = {"Authorization": f"Bearer {key}"}
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "count to a thousand"}],
        "max_tokens": 4000,
        "logit_bias": banned,
        "stream": True,
        "logprobs": True,
    }
    k, read = 20, 0  # content events read; with logprobs each carries exactly the tokens it covers
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60
    ) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                read += len((choice.get("logprobs") or {}).get("content") or [])
            if read >= k:
                break  # hang up: the with-block closes the connection
    (row,) = wait_rows(db, "hangup", 1)
    usage = row["response"]["usage"]
    assert row["response"]["status"] == 499
    # Charged what it was sent (counted as each chunk is handed on): what it read, plus at most
    # the one event in flight when it hung up; nowhere near the 4,000 it asked for.
    assert k <= usage["completion_tokens"] <= k + 1, usage
    assert usage["prompt_tokens"] > 0
    charged = usage["prompt_tokens"] + usage["completion_tokens"]
    own = httpx.get(f"{url}/v1/usage", headers=headers, timeout=30).json()
    assert own["total_tokens"] == charged
    live = own["keys"][0]["live"]
    assert live["tokens_today"] == charged and live["in_flight"] == 0


class _Recorder:
    """A monitor that only records what it is fed (tests what reaches detection, not detection)."""

    def __init__(self):
        self.records: list[dict] = []

    def observe(self, record: dict):
        self.records.append(record)


def test_abandoned_requests_with_tokens_reach_online_detection(tmp_path):
    """Issue 24 #2: only status-200 rows went to the monitor, so a harvester that always hangs
    up a token early was never scored."""
    recorder = _Recorder()
    guard = Guard(
        GuardConfig(db=f"sqlite:///{tmp_path / 'ledger.db'}", watermark=False), monitor=recorder
    )

    async def scenario() -> None:
        await guard.start()
        try:
            key, _ = await asyncio.to_thread(guard.keys.create, "harvester")
            for completion in (None, 37):  # gone before any token, gone after 37
                log = RequestLog(
                    client_ip="127.0.0.1", key=key, body={"model": "tiny", "messages": []}
                )
                log.status, log.error_code = 499, "client_closed"
                if completion is not None:
                    log.set_usage({"prompt_tokens": 12, "completion_tokens": completion})
                guard.recorder.abandon(log)
        finally:
            await guard.close()  # drains the monitor's queue

    asyncio.run(scenario())
    assert [(r["response"]["status"], r["response"].get("usage")) for r in recorder.records] == [
        (499, {"prompt_tokens": 12, "completion_tokens": 37})
    ]


@pytest.fixture(scope="module")
def proxied(tmp_path_factory):
    """(url, db) of a gateway whose backend is the upstream proxy, in front of a tiny server."""
    db = f"sqlite:///{tmp_path_factory.mktemp('proxied') / 'ledger.db'}"
    with (
        serve_process("--model", MODEL, "--no-guard") as upstream,
        serve_process(
            "--upstream", upstream, "--db", db, env={"DISTILLGUARD_ADMIN_KEY": ADMIN}
        ) as url,
    ):
        yield url, db


@pytest.mark.parametrize("logprobs", [True, False])
def test_proxied_stream_hung_up_is_charged_the_deltas_received(proxied, logprobs):
    """The upstream backend has no tokenizer: it counts the tokens of the deltas it relayed
    (logprobs entries when there are some, else one per content chunk, as vLLM, TGI, llama.cpp
    and OpenAI send a chunk per token)."""
    url, db = proxied
    tok = load_model("tiny", device="cpu").tokenizer
    banned = {str(i): -100 for i in set(tok.all_special_ids) | {tok.eos_token_id}}
    account = f"proxied-{logprobs}".lower()
    key = make_key(url, account)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "count"}],
        "max_tokens": 4000,
        "logit_bias": banned,
        "stream": True,
        "logprobs": logprobs,
    }
    k, read = 20, 0
    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        json=body,
        timeout=60,
        headers={"Authorization": f"Bearer {key}"},
    ) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choices = json.loads(line[6:])["choices"]
                read += bool(choices and choices[0]["delta"].get("content"))
            if read >= k:
                break
    (row,) = wait_rows(db, account, 1)
    usage = row["response"]["usage"]
    assert row["response"]["status"] == 499
    assert k <= usage["completion_tokens"] <= k + 10, usage
    assert usage["prompt_tokens"] >= len("count")  # the upper bound the budget reserved
