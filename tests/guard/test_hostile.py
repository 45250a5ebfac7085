"""Hostile request bodies against a real gateway (issue 24): each gets a 4xx in OpenAI's shape and a
ledger row, and afterwards another account is still served and ``/healthz`` is still 200.

Before the fixes: a lone surrogate killed the ledger writer (every later request hung while
``/healthz`` said 200); ``logit_bias`` keys like ``"²"`` and 10,000-level nesting gave a 500 with no
ledger row, and the ``"²"`` one leaked its concurrency lease for 600 s; concurrent retries with one
Idempotency-Key each ran a generation and all but one got a 503.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import httpx
import pytest
from sqlalchemy import select

from distillguard.guard.db import make_engine
from distillguard.guard.gateway import Guard, GuardConfig, IdempotencyInProgress, RequestLog
from distillguard.guard.schema import LedgerRow
from tests.servers import ledger_db_url, server_process

ADMIN = "admin-" + uuid.uuid4().hex
MESSAGES = '[{"role": "user", "content": "hi"}]'


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def gateway(request, tmp_path_factory):
    """(base URL, SQLAlchemy engine on its ledger, its URL) of `distillguard serve --model tiny` with the guard on."""
    db = ledger_db_url(request, tmp_path_factory)
    with server_process(
        "--model", "tiny", "--db", db, env={"DISTILLGUARD_ADMIN_KEY": ADMIN}
    ) as server:
        engine = make_engine(db)
        yield server.url, engine, db
        engine.dispose()


def new_key(gw, account: str | None = None, **limits) -> tuple[str, str]:
    """(secret key, account) of a fresh account."""
    account = account or f"acct-{uuid.uuid4().hex[:10]}"
    resp = httpx.post(
        f"{gw[0]}/admin/keys",
        json={"account": account, **limits},
        headers={"Authorization": f"Bearer {ADMIN}"},
        timeout=30,
    )
    assert resp.status_code == 201, resp.text
    return resp.json()["key"], account


def post(
    gw, key: str, raw: bytes, headers: dict | None = None, timeout: float = 30
) -> httpx.Response:
    return httpx.post(
        f"{gw[0]}/v1/chat/completions",
        content=raw,
        timeout=timeout,
        headers={
            "Authorization": f"Bearer {key}",
            "Content-Type": "application/json",
            **(headers or {}),
        },
    )


def rows(gw, account: str) -> list:
    with gw[1].connect() as conn:
        return list(
            conn.execute(
                select(LedgerRow).where(LedgerRow.account_id == account).order_by(LedgerRow.id)
            )
        )


def assert_openai_error(resp: httpx.Response, status: int, code: str, param: str | None) -> None:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["code"], error["param"]) == (code, param), error


def assert_still_serving(gw) -> None:
    """Another account's ordinary request succeeds and the health check passes."""
    other, _ = new_key(gw)
    ok = post(
        gw, other, b'{"model": "tiny", "messages": ' + MESSAGES.encode() + b', "max_tokens": 2}'
    )
    assert ok.status_code == 200, ok.text
    assert httpx.get(f"{gw[0]}/healthz", timeout=30).status_code == 200


# A lone surrogate as a JSON escape, in each place a string can be: (body, param named in the 400).
SURROGATES = [
    ('{"model": "tiny\\ud800", "messages": %s}' % MESSAGES, "model"),
    (
        '{"model": "tiny", "messages": [{"role": "user", "content": "a\\udc00b"}]}',
        "messages[0].content",
    ),
    (
        '{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
        "messages[0].content[0].text",
    ),
    (
        '{"model": "tiny", "messages": [{"role": "user", "content": "x", "name": "\\ud800"}]}',
        "messages[0].name",
    ),
    ('{"model": "tiny", "messages": %s, "stop": ["ok", "\\udfff"]}' % MESSAGES, "stop[1]"),
    ('{"model": "tiny", "messages": %s, "user": "\\ud800"}' % MESSAGES, "user"),
    (
        '{"model": "tiny", "messages": %s, "logit_bias": {"\\ud800": 1}}' % MESSAGES,
        "logit_bias.\\ud800",
    ),
    ('{"model": "tiny", "messages": %s, "\\ud800": 1}' % MESSAGES, "\\ud800"),
    (
        '{"model": "tiny", "messages": %s, "metadata": {"k": ["\\ud800"]}}' % MESSAGES,
        "metadata.k[0]",
    ),
]


@pytest.mark.parametrize(("raw", "param"), SURROGATES, ids=[p for _, p in SURROGATES])
def test_a_lone_surrogate_is_a_400_naming_the_field_and_the_gateway_keeps_serving(
    gateway, raw, param
):
    key, account = new_key(gateway)
    resp = post(gateway, key, raw.encode())
    assert_openai_error(resp, 400, "invalid_unicode", param)
    assert (
        f"'{param}'" in resp.json()["error"]["message"]
    )  # printable: the surrogate written as its escape
    [row] = rows(gateway, account)
    assert (row.status, row.error_code) == (400, "invalid_unicode")
    assert_still_serving(gateway)


def test_a_surrogate_pair_is_ordinary_text(gateway):
    key, account = new_key(gateway)
    resp = post(
        gateway,
        key,
        b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}], '
        b'"max_tokens": 2}',
    )
    assert resp.status_code == 200, resp.text
    assert rows(gateway, account)[0].request_body["messages"][0]["content"] == "\U0001f600"


@pytest.mark.parametrize("token", ["²", "١٢", "5" * 5000, "+1", " 1", "12345678901"])
def test_a_logit_bias_key_that_is_not_an_ascii_token_id_is_a_400_and_leaks_no_lease(gateway, token):
    key, account = new_key(gateway, max_concurrent=1)
    raw = '{"model": "tiny", "messages": %s, "max_tokens": 2, "logit_bias": {"%s": 1}}' % (
        MESSAGES,
        token,
    )
    assert_openai_error(post(gateway, key, raw.encode()), 400, "invalid_value", "logit_bias")
    [row] = rows(gateway, account)
    assert row.status == 400
    # the one concurrency slot of the key is free again (before: 429 "in flight" for 600 s)
    again = post(
        gateway, key, b'{"model": "tiny", "messages": ' + MESSAGES.encode() + b', "max_tokens": 2}'
    )
    assert again.status_code == 200, again.text
    assert_still_serving(gateway)


NESTED = 10_000
# (id, body, code, param)
DEEP = [
    (
        "nested list in an unknown field",
        (
            '{"model": "tiny", "messages": %s, "extra": %s%s}'
            % (MESSAGES, "[" * NESTED, "]" * NESTED)
        ).encode(),
        "invalid_json",
        None,
    ),
    (
        "nested objects as the content",
        (
            '{"model": "tiny", "messages": [{"role": "user", "content": %s1%s}]}'
            % ('{"a":' * NESTED, "}" * NESTED)
        ).encode(),
        "invalid_json",
        None,
    ),
    (
        "a 100,000-digit seed",
        ('{"model": "tiny", "messages": %s, "seed": %s}' % (MESSAGES, "9" * 100_000)).encode(),
        "invalid_json",
        None,
    ),
    (
        "a 5,000-digit max_tokens",
        ('{"model": "tiny", "messages": %s, "max_tokens": %s}' % (MESSAGES, "1" * 5000)).encode(),
        "invalid_json",
        None,
    ),
    # not JSON numbers a database can store (PostgreSQL's jsonb refuses them)
    (
        "1e999",
        ('{"model": "tiny", "messages": %s, "temperature": 1e999}' % MESSAGES).encode(),
        "invalid_value",
        "temperature",
    ),
    (
        "NaN",
        ('{"model": "tiny", "messages": %s, "top_p": NaN}' % MESSAGES).encode(),
        "invalid_value",
        "top_p",
    ),
    (
        "-1e999 in an unknown field",
        ('{"model": "tiny", "messages": %s, "extra": [-1e999]}' % MESSAGES).encode(),
        "unknown_parameter",
        "extra",
    ),
]


@pytest.mark.parametrize(("raw", "code", "param"), [d[1:] for d in DEEP], ids=[d[0] for d in DEEP])
def test_deep_nesting_and_huge_numbers_are_a_400_with_a_ledger_row(gateway, raw, code, param):
    key, account = new_key(gateway)
    assert_openai_error(post(gateway, key, raw), 400, code, param)
    [row] = rows(gateway, account)
    assert row.status == 400 and "_invalid" in row.request_body
    assert_still_serving(gateway)


def test_strings_the_database_columns_cannot_hold_still_get_their_own_answer(gateway):
    """A 300-character model name (the column holds 256) is a 404 with a row, not a 503."""
    key, account = new_key(gateway)
    resp = post(gateway, key, ('{"model": "%s", "messages": %s}' % ("m" * 300, MESSAGES)).encode())
    assert_openai_error(resp, 404, "model_not_found", "model")
    [row] = rows(gateway, account)
    assert row.status == 404 and row.request_body["model"] == "m" * 300
    assert_still_serving(gateway)


def test_concurrent_retries_with_one_idempotency_key_generate_once(gateway):
    """Eight copies of one request, sent at once under one Idempotency-Key: one generation; the
    others wait for it (409 idempotency_in_progress with Retry-After) or get its stored answer."""
    key, account = new_key(gateway)
    raw = b'{"model": "tiny", "messages": ' + MESSAGES.encode() + b', "max_tokens": 200, "seed": 1}'
    headers = {"Idempotency-Key": "retry-" + uuid.uuid4().hex}
    start = threading.Barrier(8)
    answers: list[httpx.Response] = []

    def send():
        start.wait()
        answers.append(post(gateway, key, raw, headers, timeout=120))

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    generated = [
        r for r in answers if r.status_code == 200 and "idempotent-replayed" not in r.headers
    ]
    replayed = [r for r in answers if r.status_code == 200 and "idempotent-replayed" in r.headers]
    waiting = [r for r in answers if r.status_code == 409]
    assert len(generated) == 1 and len(generated) + len(replayed) + len(waiting) == 8, [
        (r.status_code, r.json().get("error", {}).get("code")) for r in answers
    ]
    assert all(r.json() == generated[0].json() for r in replayed)
    for r in waiting:
        assert_openai_error(r, 409, "idempotency_in_progress", "Idempotency-Key")
        assert int(r.headers["Retry-After"]) >= 1
    again = post(gateway, key, raw, headers)  # once it is done, a retry is its stored answer
    assert again.status_code == 200 and again.json() == generated[0].json()
    statuses = sorted(r.status for r in rows(gateway, account))
    assert statuses.count(200) == 1 + len(replayed) + 1 and statuses.count(409) == len(waiting)
    assert (
        sum(
            1
            for r in rows(gateway, account)
            if r.status == 200 and r.completion_tokens and r.policy_action != "idempotent_replay"
        )
        == 1
    )
    assert_still_serving(gateway)


def test_concurrent_retries_across_two_replicas_generate_once(gateway):
    """The claim is a row under the table's primary key, so it holds across replicas too."""
    key, account = new_key(gateway)
    raw = b'{"model": "tiny", "messages": ' + MESSAGES.encode() + b', "max_tokens": 200, "seed": 2}'
    headers = {"Idempotency-Key": "replicas-" + uuid.uuid4().hex}
    with server_process(
        "--model", "tiny", "--db", gateway[2], env={"DISTILLGUARD_ADMIN_KEY": ADMIN}
    ) as second:
        start = threading.Barrier(8)
        answers: list[httpx.Response] = []

        def send(url):
            start.wait()
            answers.append(
                httpx.post(
                    f"{url}/v1/chat/completions",
                    content=raw,
                    timeout=120,
                    headers={
                        "Authorization": f"Bearer {key}",
                        "Content-Type": "application/json",
                        **headers,
                    },
                )
            )

        threads = [
            threading.Thread(target=send, args=(url,)) for url in [gateway[0], second.url] * 4
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(answers) == 8 and all(r.status_code in (200, 409) for r in answers), [
        (r.status_code, r.json().get("error", {}).get("code")) for r in answers
    ]
    assert (
        sum(1 for r in answers if r.status_code == 200 and "idempotent-replayed" not in r.headers)
        == 1
    )
    assert sum(1 for r in rows(gateway, account) if r.status == 200 and r.completion_tokens) == 1


def _guard_log(guard: Guard, key, idem: str = "k1", request_hash: str = "h1") -> RequestLog:
    return RequestLog(
        client_ip="127.0.0.1", key=key, idempotency_key=idem, request_hash=request_hash
    )


def test_idempotency_claims_are_released_renewed_and_taken_over_when_stale(db_url):
    """A failed request releases its claim (the retry generates); a running one keeps renewing its
    claim, so it is never taken over; one whose replica died (never renewed) is taken over after
    ``idempotency_claim_ttl_s``, so a crash does not block the key forever."""
    from sqlalchemy import insert, null

    from distillguard.guard.schema import IdempotentResponse

    async def main():
        guard = Guard(GuardConfig(db=db_url, watermark=False, idempotency_claim_ttl_s=1.5))
        await guard.start()
        key, _ = guard.keys.create("claims")
        first = _guard_log(guard, key)
        assert await guard.claims.replay(first) is None  # claimed
        with pytest.raises(IdempotencyInProgress):
            await guard.claims.replay(_guard_log(guard, key))
        first.status, first.error_code = 429, "rate_limit_exceeded"
        await guard.recorder.finish(first)  # failed: the claim is released with its ledger row
        running = _guard_log(guard, key)
        assert await guard.claims.replay(running) is None
        await asyncio.sleep(4.5)  # three times the claim's lifetime: renewed meanwhile
        with pytest.raises(IdempotencyInProgress):
            await guard.claims.replay(_guard_log(guard, key))
        guard.recorder.abandon(running)  # the client went away: released too
        await asyncio.sleep(0)
        # a claim left by a replica that crashed: never renewed, taken over once stale
        with guard.engine.begin() as conn:
            conn.execute(
                insert(IdempotentResponse).values(
                    account_id="claims",
                    key="k2",
                    request_hash="h1",
                    request_id="req-dead",
                    response=null(),
                    created_at=time.time() - 60,
                )
            )
        orphan = _guard_log(guard, key, "k2")
        assert await guard.claims.replay(orphan) is None
        orphan.add_response(
            {"choices": [{"index": 0, "message": {"content": "answer"}}], "usage": {}}
        )
        await guard.recorder.finish(orphan)
        replayed = await guard.claims.replay(_guard_log(guard, key, "k2"))
        retried = _guard_log(guard, key)
        retried_claimed = await guard.claims.replay(retried)
        await guard.close()
        return replayed, retried_claimed

    replayed, retried_claimed = asyncio.run(main())
    assert replayed["choices"][0]["message"]["content"] == "answer"
    assert retried_claimed is None  # the abandoned request's claim was released


class _BuggyBackend:
    """A backend with a bug: ``complete`` raises something that is not an APIError. No real
    backend does so on demand, which is why this one is a stand-in."""

    capabilities = frozenset()

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def model_ids(self) -> list[str]:
        return ["tiny"]

    async def budget(self, req) -> int:
        return 10

    def prompt_tokens(self, req) -> int:
        return 3

    def count_tokens(self, text: str) -> int:
        return len(text)

    async def complete(self, req, **kwargs) -> dict:
        raise RuntimeError("a bug in the backend")

    async def stream(self, req, **kwargs):
        raise RuntimeError("a bug in the backend")


def test_an_unexpected_error_after_admission_settles_the_lease_and_is_ledgered(tmp_path):
    """Before: only APIError settled the lease and wrote the row, so a bug (like int('²') in the
    backend) left a 500 with no ledger row and the key's concurrency slot taken for 600 s."""
    from distillguard.app import create_app
    from distillguard.guard.limits import Limits
    from distillguard.serve.config import ServeConfig

    db = f"sqlite:///{tmp_path / 'ledger.db'}"

    async def main():
        guard = Guard(GuardConfig(db=db, watermark=False))
        app = create_app(_BuggyBackend(), ServeConfig(model="tiny"), guard)
        await guard.start()
        _, secret = guard.keys.create("buggy", limits=Limits(max_concurrent=1))
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            answers = [
                await client.post(
                    "/v1/chat/completions",
                    headers={"Authorization": f"Bearer {secret}"},
                    json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]},
                )
                for _ in range(2)
            ]
        await guard.close()
        return answers

    answers = asyncio.run(main())
    for resp in answers:  # the second is a 500 too, not a 429 "in flight"
        assert_openai_error(resp, 500, "internal_error", None)
    engine = make_engine(db)
    with engine.connect() as conn:
        statuses = [
            (r.status, r.error_code)
            for r in conn.execute(select(LedgerRow).where(LedgerRow.account_id == "buggy"))
        ]
    engine.dispose()
    assert statuses == [(500, "internal_error")] * 2
