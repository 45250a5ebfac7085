"""The admin API under hostile input: every bad value is a 400 in OpenAI's shape naming the value
and the bound, never a 500; a bad value already in the database never breaks a listing (issue 24,
item 8). Real ``distillguard serve`` on SQLite and PostgreSQL, raw HTTP."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest
from sqlalchemy import insert

from distillguard.guard.db import make_engine
from distillguard.guard.schema import Verdict
from tests.servers import run_cli, server_process

ADMIN = "admin-" + uuid.uuid4().hex


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def gateway(request, tmp_path_factory):
    """(base URL, db URL) of `distillguard serve --model tiny` with an admin key."""
    if request.param == "sqlite":
        db = f"sqlite:///{tmp_path_factory.mktemp('admin') / 'ledger.db'}"
    else:
        import psycopg

        host, port, user = request.getfixturevalue("postgres_server")
        name = f"adm_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(host=host, port=port, user=user, dbname="postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        db = f"postgresql+psycopg://{user}@{host}:{port}/{name}"
    with server_process("--model", "tiny", "--db", db, env={"DISTILLGUARD_ADMIN_KEY": ADMIN}) as server:
        yield server.url, db


def admin(gw, method: str, path: str, headers: dict | None = None, **kw) -> httpx.Response:
    return httpx.request(method, gw[0] + path, headers={"Authorization": f"Bearer {ADMIN}", **(headers or {})},
                         timeout=30, **kw)


def post_raw(gw, path: str, raw: str) -> httpx.Response:
    """A body sent as written (``1e999`` and lone-surrogate escapes survive no JSON encoder)."""
    return admin(gw, "POST", path, content=raw.encode(), headers={"Content-Type": "application/json"})


def error_of(resp: httpx.Response, status: int = 400) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


# --- numeric limits ------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value,bound", [
    ("rpm", 10**30, "1000000000"),
    ("tpm", 2**31, "1000000000"),  # past PostgreSQL's int4 column
    ("max_concurrent", 2**63, "1000000000"),
    ("daily_tokens", 2**63, "1000000000000000"),  # past SQLite's and PostgreSQL's int8
    ("daily_tokens", 2**53 + 1, "1000000000000000"),  # past the exact doubles of Redis's Lua
])
def test_limit_beyond_its_bound_is_a_400_naming_the_bound(gateway, field, value, bound):
    err = error_of(admin(gateway, "POST", "/admin/keys", json={"account": "big", field: value}))
    assert err["param"] == field and err["code"] == "invalid_value"
    assert bound in err["message"] and str(value)[:20] in err["message"]
    assert admin(gateway, "GET", "/admin/keys", params={"account": "big"}).json()["data"] == []


def test_limits_at_their_bounds_are_accepted(gateway):
    top = {"rpm": 10**9, "tpm": 10**9, "max_concurrent": 10**9, "daily_tokens": 10**15}
    made = admin(gateway, "POST", "/admin/keys", json={"account": "roomy", **top})
    assert made.status_code == 201, made.text
    assert {k: made.json()[k] for k in top} == top
    listed = admin(gateway, "GET", "/admin/keys", params={"account": "roomy"}).json()["data"]
    assert {k: listed[0][k] for k in top} == top


# --- verdict scores ------------------------------------------------------------------------------


@pytest.mark.parametrize("raw_score", ["1e999", "-1e999", "NaN", "Infinity", "-Infinity"])
def test_non_finite_verdict_score_is_a_400(gateway, raw_score):
    resp = post_raw(gateway, "/admin/accounts/scored/verdict", f'{{"level": "watch", "score": {raw_score}}}')
    err = error_of(resp)
    assert err["param"] == "score"
    assert admin(gateway, "GET", "/admin/verdicts", params={"account": "scored"}).json()["data"] == []


def test_verdict_listing_survives_a_non_finite_score_already_stored(gateway):
    """A row written before scores were checked (or by a detector that overflowed) must not turn
    every later listing into a 500: the score reads back as null."""
    engine = make_engine(gateway[1])
    try:
        with engine.begin() as conn:
            for score in (float("inf"), float("-inf"), float("nan")):
                conn.execute(insert(Verdict).values(ts=1.0, account_id="overflowed", level=1, score=score,
                                                    reasons=["old row"], source="offline"))
    finally:
        engine.dispose()
    for params in ({"account": "overflowed"}, {}):
        resp = admin(gateway, "GET", "/admin/verdicts", params=params)
        assert resp.status_code == 200, resp.text
    rows = admin(gateway, "GET", "/admin/verdicts", params={"account": "overflowed"}).json()["data"]
    assert [r["score"] for r in rows] == [None, None, None]
    ok = admin(gateway, "POST", "/admin/accounts/overflowed/verdict", json={"level": "ok", "score": 0.5})
    assert ok.status_code == 201 and ok.json()["score"] == 0.5


# --- account names -------------------------------------------------------------------------------

BAD_NAMES = ["a\u0000b", "a/b", "tab\there", "bell\u0007", "new\nline", " padded", "", "x" * 129, "é"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_account_names_are_refused_by_the_admin_api(gateway, name):
    err = error_of(admin(gateway, "POST", "/admin/keys", json={"account": name}))
    assert err["param"] == "account" and err["code"] == "invalid_value"
    assert repr(name)[:60] in err["message"] and "[A-Za-z0-9._@:+-]" in err["message"]


def test_a_lone_surrogate_account_name_is_refused(gateway):
    err = error_of(post_raw(gateway, "/admin/keys", '{"account": "x\\ud800"}'))
    assert err["param"] in ("account", None)
    assert admin(gateway, "GET", "/admin/keys").status_code == 200


@pytest.mark.parametrize("name", ["a%00b", "tab%09", "%20padded", "x" * 129])
def test_bad_account_names_in_paths_are_refused(gateway, name):
    err = error_of(admin(gateway, "POST", f"/admin/accounts/{name}/verdict", json={"level": "watch"}))
    assert err["param"] == "account"


def test_good_account_names_are_accepted(gateway):
    for name in ("alice", "alice@example.com", "org:team-1.eu+test", "A_b", "x" * 128):
        made = admin(gateway, "POST", "/admin/keys", json={"account": name})
        assert made.status_code == 201, made.text
        assert made.json()["account"] == name


def test_bad_account_name_is_refused_by_the_cli(gateway):
    proc = run_cli("keys", "create", "--account", "a/b", "--db", gateway[1])
    assert proc.returncode == 2
    assert "'a/b'" in proc.stderr and "[A-Za-z0-9._@:+-]" in proc.stderr
    proc = run_cli("keys", "create", "--account", "ok-name", "--rpm", str(10**30), "--db", gateway[1], "--json")
    assert proc.returncode == 2 and "1000000000" in proc.stderr
    assert json.loads(run_cli("keys", "create", "--account", "ok-name", "--db", gateway[1], "--json").stdout)[
        "account"] == "ok-name"
