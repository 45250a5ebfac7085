"""Who can reach what on a real gateway (issue 24, items 9 and 11): the client address the ledger
records cannot be chosen by the client, /metrics is the admin's, the API docs are off unless asked.
"""

from __future__ import annotations

import uuid

import httpx
import pytest
from sqlalchemy import select

from distillguard.guard.db import make_engine
from distillguard.guard.schema import LedgerRow
from tests.servers import serve_process

ADMIN = "admin-" + uuid.uuid4().hex
SPOOFED = "203.0.113.7"


@pytest.fixture(scope="module", params=["defaults", "proxy"])
def gateway(request, tmp_path_factory):
    """(base URL, db URL, setting) of a guarded tiny server: with the defaults, or behind a proxy on
    loopback that it trusts (``--forwarded-allow-ips 127.0.0.1``), metrics open and docs on."""
    db = f"sqlite:///{tmp_path_factory.mktemp('exposure') / 'ledger.db'}"
    extra = (
        ()
        if request.param == "defaults"
        else ("--forwarded-allow-ips", "127.0.0.1", "--metrics-auth", "none", "--docs")
    )
    with serve_process(
        "--model", "tiny", "--db", db, *extra, env={"DISTILLGUARD_ADMIN_KEY": ADMIN}
    ) as url:
        yield url, db, request.param


def as_admin(key: str = ADMIN) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_x_forwarded_for_is_honoured_only_from_a_configured_proxy(gateway):
    url, db, setting = gateway
    made = httpx.post(f"{url}/admin/keys", json={"account": f"xff-{setting}"}, headers=as_admin())
    key = made.json()["key"]
    marker = uuid.uuid4().hex
    resp = httpx.post(
        f"{url}/v1/chat/completions",
        timeout=60,
        headers={"Authorization": f"Bearer {key}", "X-Forwarded-For": SPOOFED},
        json={"model": "tiny", "messages": [{"role": "user", "content": marker}], "max_tokens": 2},
    )
    assert resp.status_code == 200, resp.text
    engine = make_engine(db)
    with engine.connect() as conn:
        ips = [
            r.client_ip
            for r in conn.execute(select(LedgerRow.client_ip, LedgerRow.request_body))
            if marker in str(r.request_body)
        ]
    engine.dispose()
    assert ips == (["127.0.0.1"] if setting == "defaults" else [SPOOFED])


def test_metrics_need_the_admin_key_by_default(gateway):
    url, _, setting = gateway
    anonymous = httpx.get(f"{url}/metrics")
    if setting == "defaults":
        assert (
            anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "missing_api_key"
        )
        wrong = httpx.get(f"{url}/metrics", headers=as_admin("dg-not-the-admin"))
        assert wrong.status_code == 401
    else:
        assert anonymous.status_code == 200 and "distillguard_requests_total" in anonymous.text
    admin = httpx.get(f"{url}/metrics", headers=as_admin())
    assert admin.status_code == 200 and "distillguard_requests_total" in admin.text


def test_api_docs_are_off_unless_asked_for(gateway):
    url, _, setting = gateway
    for path in ("/docs", "/redoc", "/openapi.json"):
        resp = httpx.get(url + path, headers=as_admin())
        if setting == "defaults":
            assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found", path
        else:
            assert resp.status_code == 200, path
