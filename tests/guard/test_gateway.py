"""The guard in front of a real server: keys, limits, ledger, admin API and metrics, on SQLite
and PostgreSQL, through the real ``openai`` client and raw HTTP on loopback."""

from __future__ import annotations

import json
import threading
import uuid

import httpx
import openai
import pytest

from distillguard.guard.ledger import without_nul
from tests.servers import ledger_db_url, run_cli, serve_process

ADMIN = "admin-" + uuid.uuid4().hex


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def gateway(request, tmp_path_factory):
    """(base URL, db URL) of `distillguard serve --model tiny` with the guard on."""
    db = ledger_db_url(request, tmp_path_factory)
    with serve_process("--model", "tiny", "--db", db, env={"DISTILLGUARD_ADMIN_KEY": ADMIN}) as url:
        yield url, db


def admin(gw, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(
        method, gw[0] + path, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30, **kw
    )


def new_key(gw, account: str, **limits) -> str:
    resp = admin(gw, "POST", "/admin/keys", json={"account": account, **limits})
    assert resp.status_code == 201, resp.text
    return resp.json()["key"]


cli = run_cli


def chat(gw, key: str | None, content: str = "hi", **extra) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 4,
        **extra,
    }
    return httpx.post(f"{gw[0]}/v1/chat/completions", json=body, headers=headers, timeout=60)


def export(gw, *args: str) -> list[dict]:
    proc = cli("ledger", "export", "--db", gw[1], *args)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_keys_are_required_and_checked(gateway):
    assert chat(gateway, None).status_code == 401
    bad = chat(gateway, "dg-not-a-key")
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
    key = new_key(gateway, "alice")
    with openai.OpenAI(base_url=gateway[0] + "/v1", api_key=key, max_retries=0) as client:
        r = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=5, seed=1
        )
        assert r.usage.completion_tokens >= 1
    with openai.OpenAI(base_url=gateway[0] + "/v1", api_key="dg-wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "x"}]
            )


def test_ledger_holds_every_request_and_never_the_key(gateway):
    key = new_key(gateway, "bob")
    marker = uuid.uuid4().hex
    with openai.OpenAI(base_url=gateway[0] + "/v1", api_key=key, max_retries=0) as client:
        plain = client.chat.completions.create(
            model="tiny",
            messages=[
                {"role": "system", "content": "s"},
                {"role": "user", "content": f"plain {marker}"},
            ],
            max_tokens=6,
            seed=3,
            logprobs=True,
            top_logprobs=2,
        )
        streamed = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": f"stream {marker}"}],
                max_tokens=6,
                seed=4,
                stream=True,
            )
            if c.choices
        )
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"bad {marker}"}], temperature=5
            )
    rows = [r for r in export(gateway, "--account", "bob") if marker in json.dumps(r["request"])]
    by_kind = {r["request"]["messages"][-1]["content"].split()[0]: r for r in rows}
    assert set(by_kind) == {"plain", "stream", "bad"}
    # the ledger stores a NUL the tiny model may generate as U+FFFD (PostgreSQL stores none)
    assert by_kind["plain"]["response"]["text"] == without_nul(plain.choices[0].message.content)
    assert (
        by_kind["plain"]["response"]["usage"]["completion_tokens"] == plain.usage.completion_tokens
    )
    assert by_kind["plain"]["request"]["top_logprobs"] == 2  # the full request body
    assert by_kind["stream"]["response"]["text"] == without_nul(streamed)
    assert (
        by_kind["stream"]["response"]["usage"]["prompt_tokens"] > 0
    )  # usage kept though not asked for
    assert by_kind["bad"]["response"]["status"] == 400
    assert all(r["account"] == "bob" and r["ip"] == "127.0.0.1" for r in rows)
    everything = cli("ledger", "export", "--db", gateway[1]).stdout
    assert key not in everything and key[8:] not in everything


def test_admin_api_and_own_usage(gateway):
    alice = new_key(gateway, "carol")
    dave = new_key(gateway, "dave")
    assert chat(gateway, alice).status_code == 200
    own = httpx.get(f"{gateway[0]}/v1/usage", headers={"Authorization": f"Bearer {alice}"}).json()
    assert own["account"] == "carol" and own["requests"] == 1 and own["total_tokens"] > 0
    assert own["keys"][0]["live"]["requests"] == 1
    forbidden = [
        httpx.get(f"{gateway[0]}/admin/keys", headers={"Authorization": f"Bearer {alice}"}),
        httpx.get(
            f"{gateway[0]}/admin/accounts/dave/usage", headers={"Authorization": f"Bearer {alice}"}
        ),
        httpx.post(
            f"{gateway[0]}/admin/keys",
            json={"account": "carol"},
            headers={"Authorization": f"Bearer {alice}"},
        ),
        httpx.delete(f"{gateway[0]}/admin/keys/x", headers={"Authorization": f"Bearer {dave}"}),
    ]
    assert [r.status_code for r in forbidden] == [403, 403, 403, 403]
    assert all(r.json()["error"]["type"] == "permission_error" for r in forbidden)
    assert httpx.get(f"{gateway[0]}/admin/keys").status_code == 401
    listed = admin(gateway, "GET", "/admin/keys", params={"account": "carol"}).json()["data"]
    assert len(listed) == 1 and "key" not in listed[0] and "key_hash" not in listed[0]
    assert admin(gateway, "GET", "/admin/accounts/carol/usage").json()["requests"] == 1
    bad = admin(gateway, "POST", "/admin/keys", json={"account": "x", "rpm": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "rpm"
    # Revocation through the admin API takes effect at once.
    key_id = listed[0]["id"]
    assert admin(gateway, "DELETE", f"/admin/keys/{key_id}").json()["active"] is False
    assert chat(gateway, alice).status_code == 401
    assert admin(gateway, "DELETE", "/admin/keys/key_missing").status_code == 404


def test_rate_limit_exact_under_concurrency(gateway):
    key = new_key(gateway, "erin", rpm=5)
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def fire():
        r = chat(gateway, key, max_tokens=2)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=fire) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in results)
    assert codes == [200] * 5 + [429] * 7
    limited = next(r for r in results if r.status_code == 429)
    assert int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    metrics = admin(
        gateway, "GET", "/metrics"
    ).text  # behind the admin key by default (--metrics-auth)
    assert 'distillguard_requests_total{status="429"}' in metrics
    assert "erin" not in metrics  # no account labels unless enabled


def test_cli_keys_against_the_same_database(gateway):
    made = cli(
        "keys", "create", "--account", "frank", "--tpm", "1000", "--db", gateway[1], "--json"
    )
    assert made.returncode == 0, made.stderr
    record = json.loads(made.stdout)
    assert chat(gateway, record["key"]).status_code == 200
    listed = cli("keys", "list", "--account", "frank", "--db", gateway[1], "--json")
    assert (
        json.loads(listed.stdout.splitlines()[0])["tpm"] == 1000
        and record["key"] not in listed.stdout
    )
    assert cli("keys", "revoke", record["id"], "--db", gateway[1]).returncode == 0
    bad = cli("keys", "revoke", "key_nope", "--db", gateway[1])
    assert bad.returncode == 2 and "no key with id" in bad.stderr and "Traceback" not in bad.stderr


def test_idempotency_key_answers_a_retry_once(gateway):
    key = new_key(gateway, "grace")
    idem = {"Idempotency-Key": "harvest-" + uuid.uuid4().hex}
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "same question"}],
        "max_tokens": 6,
    }
    headers = {"Authorization": f"Bearer {key}", **idem}
    first = httpx.post(f"{gateway[0]}/v1/chat/completions", json=body, headers=headers, timeout=60)
    again = httpx.post(f"{gateway[0]}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
    other = httpx.post(
        f"{gateway[0]}/v1/chat/completions", json={**body, "max_tokens": 7}, headers=headers
    )
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"
    streamed = httpx.post(
        f"{gateway[0]}/v1/chat/completions", json={**body, "stream": True}, headers=headers
    )
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "Idempotency-Key"
    rows = export(gateway, "--account", "grace")
    generated = [
        r
        for r in rows
        if r["response"]["status"] == 200
        and r["response"].get("usage", {}).get("completion_tokens")
    ]
    assert len(generated) == 1  # the teacher answered once; the retry was a replay


def test_nul_in_a_prompt_is_served_and_recorded(gateway):
    """A NUL in a prompt (PostgreSQL stores none in text or jsonb) is answered, streamed or not,
    and the ledger records it as U+FFFD; before the fix the row was refused with a 503."""
    key = new_key(gateway, "nul-sender")
    assert chat(gateway, key, "a\x00b").status_code == 200
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "c\x00d"}],
        "max_tokens": 4,
        "stream": True,
    }
    with httpx.stream(
        "POST",
        f"{gateway[0]}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    ) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]"
    prompts = {
        rec["request"]["messages"][0]["content"]
        for rec in export(gateway, "--account", "nul-sender")
    }
    assert prompts == {"a\ufffdb", "c\ufffdd"}
