"""A chat request's ``Content-Type``: a body declared as anything but JSON in UTF-8 is a 415 in
OpenAI's shape, recorded in the ledger like any refusal; ``application/json`` (any case, charset
absent or UTF-8) and no ``Content-Type`` at all are served.

In process (``httpx.ASGITransport`` over the gateway app and the tiny model, as
tests/test_pipeline.py): the header is read by the app, not the HTTP server; the real ``openai``
client checks what it sends is accepted.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager

import httpx
import openai
import pytest
from sqlalchemy import select

from distillguard.app import create_app
from distillguard.guard.gateway import Guard, GuardConfig
from distillguard.guard.schema import LedgerRow
from distillguard.models import load_model
from distillguard.serve.config import ServeConfig
from distillguard.serve.local import LocalBackend

CHAT = "/v1/chat/completions"
HI = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BODY = json.dumps(HI).encode()

REFUSED = [
    "text/plain",
    "text/plain; charset=utf-8",
    "application/x-www-form-urlencoded",  # curl -d without -H
    "multipart/form-data; boundary=x",
    "application/json; charset=utf-16",
    "application/json; charset=latin-1",
    "application/json; charset=utf-32",
    "application/xml",
    "application/jsonx",
    "application/vnd.api+json",
    "*/*",
    "application/json, text/plain",
    "",
    "json",
    "\xff",
    "a" * 8000,
]
ACCEPTED = [
    "application/json",
    "Application/JSON",
    "application/json; charset=utf-8",
    "application/json;charset=UTF-8",
    'application/json; charset="utf-8"',
    "APPLICATION/JSON ; CHARSET=Utf-8",
]


@pytest.fixture(scope="module")
def tiny_lm():
    return load_model("tiny", device="cpu")


@asynccontextmanager
async def gateway(tmp_path, tiny_lm, *, guarded: bool = True):
    """(client, guard or None, key or None) of the gateway app, its lifespan running."""
    config = ServeConfig(model="tiny")
    backend = LocalBackend(tiny_lm, config)
    guard = key = None
    if guarded:
        guard = Guard(
            GuardConfig(db=f"sqlite:///{tmp_path / 'ledger.db'}", watermark_secret="ct-secret")
        )
    app = create_app(backend, config, guard)
    async with app.router.lifespan_context(app):
        if guard is not None:
            _, key = guard.keys.create("acct")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            yield client, guard, key


def headers(key: str | None, ctype: str | None) -> dict:
    out = {"Authorization": f"Bearer {key}"} if key else {}
    if ctype is not None:
        # as sent on the wire: Starlette decodes header bytes as Latin-1
        out["Content-Type"] = ctype.encode("latin-1")
    return out


def ledger_rows(guard: Guard) -> list:
    with guard.engine.connect() as conn:
        return list(conn.execute(select(LedgerRow).order_by(LedgerRow.ts)))


def test_bodies_not_declared_as_json_are_refused_with_415_and_a_ledger_row(tmp_path, tiny_lm):
    """A valid chat body under each non-JSON Content-Type: 415 ``unsupported_content_type`` in
    OpenAI's shape naming the header and the fix, no generation, and one ledger row each (status
    415, the body kept) as other refusals get."""

    async def main():
        async with gateway(tmp_path, tiny_lm) as (client, guard, key):
            answers = [
                await client.post(CHAT, content=BODY, headers=headers(key, c)) for c in REFUSED
            ]
            return answers, ledger_rows(guard)

    answers, rows = asyncio.run(main())
    for ctype, resp in zip(REFUSED, answers, strict=True):
        assert resp.status_code == 415, (ctype[:40], resp.text)
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "unsupported_content_type"
        assert error["type"] == "invalid_request_error"
        assert error["param"] == "Content-Type"
        assert "Content-Type: application/json" in error["message"]
        assert repr(ctype[:20])[:-1] in error["message"]  # names the value it got
    assert [(r.status, r.error_code) for r in rows] == [(415, "unsupported_content_type")] * len(
        REFUSED
    )
    assert all(r.request_body == HI and r.completion_tokens is None for r in rows)


def test_a_utf16_body_is_refused_for_its_charset_not_as_bad_json(tmp_path, tiny_lm):
    """What the charset says is refused before the bytes are parsed: 415, not a 400 invalid_json
    that would send the client looking for a syntax error."""

    async def main():
        async with gateway(tmp_path, tiny_lm) as (client, _, key):
            return await client.post(
                CHAT,
                content=json.dumps(HI).encode("utf-16"),
                headers=headers(key, "application/json; charset=utf-16"),
            )

    resp = asyncio.run(main())
    assert resp.status_code == 415, resp.text
    assert resp.json()["error"]["code"] == "unsupported_content_type"


def test_json_in_utf8_and_a_missing_content_type_are_served(tmp_path, tiny_lm):
    async def main():
        async with gateway(tmp_path, tiny_lm) as (client, guard, key):
            answers = [
                await client.post(CHAT, content=BODY, headers=headers(key, c))
                for c in [*ACCEPTED, None]
            ]
            return answers, ledger_rows(guard)

    answers, rows = asyncio.run(main())
    for ctype, resp in zip([*ACCEPTED, None], answers, strict=True):
        assert resp.status_code == 200, (ctype, resp.text)
        assert resp.json()["choices"][0]["message"]["content"] is not None
    assert [r.status for r in rows] == [200] * len(answers)


def test_the_openai_client_is_served(tmp_path, tiny_lm):
    """The real client (what most callers are) sends ``application/json``: served, stream too."""

    async def main():
        async with gateway(tmp_path, tiny_lm) as (client, guard, key):
            oai = openai.AsyncOpenAI(api_key=key, base_url="http://gw/v1", http_client=client)
            whole = await oai.chat.completions.create(**HI)
            stream = await oai.chat.completions.create(**HI, stream=True)
            chunks = [chunk async for chunk in stream]
            return whole, chunks, ledger_rows(guard)

    whole, chunks, rows = asyncio.run(main())
    assert whole.choices[0].finish_reason is not None
    assert chunks and chunks[-1].choices[0].finish_reason is not None
    assert [r.status for r in rows] == [200, 200]


def test_without_the_guard_too(tmp_path, tiny_lm):
    """``serve --no-guard`` reads bodies the same way: 415 for text/plain, JSON served."""

    async def main():
        async with gateway(tmp_path, tiny_lm, guarded=False) as (client, _, _key):
            refused = await client.post(CHAT, content=BODY, headers=headers(None, "text/plain"))
            served = await client.post(
                CHAT, content=BODY, headers=headers(None, "application/json")
            )
            return refused, served

    refused, served = asyncio.run(main())
    assert refused.status_code == 415, refused.text
    assert refused.json()["error"]["code"] == "unsupported_content_type"
    assert served.status_code == 200, served.text
