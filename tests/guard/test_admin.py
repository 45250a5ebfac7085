"""The admin API under hostile input: every bad value is a 400 in OpenAI's shape naming the value
and the bound, never a 500; a bad value already in the database never breaks a listing (issue 24,
item 8). Real ``distillguard serve`` on SQLite and PostgreSQL, raw HTTP."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import openai
import pytest
from sqlalchemy import insert

from distillguard.guard.db import make_engine
from distillguard.guard.schema import Verdict
from tests.servers import ledger_db_url, run_cli, server_process

ADMIN = "admin-" + uuid.uuid4().hex


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def gateway(request, tmp_path_factory):
    """(base URL, db URL) of `distillguard serve --model tiny` with an admin key."""
    db = ledger_db_url(request, tmp_path_factory)
    with server_process(
        "--model", "tiny", "--db", db, env={"DISTILLGUARD_ADMIN_KEY": ADMIN}
    ) as server:
        yield server.url, db


def admin(gw, method: str, path: str, headers: dict | None = None, **kw) -> httpx.Response:
    return httpx.request(
        method,
        gw[0] + path,
        headers={"Authorization": f"Bearer {ADMIN}", **(headers or {})},
        timeout=30,
        **kw,
    )


def post_raw(gw, path: str, raw: str) -> httpx.Response:
    """A body sent as written (``1e999`` and lone-surrogate escapes survive no JSON encoder)."""
    return admin(
        gw, "POST", path, content=raw.encode(), headers={"Content-Type": "application/json"}
    )


def error_of(resp: httpx.Response, status: int = 400) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


# --- numeric limits ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value,bound",
    [
        ("rpm", 10**30, "1000000000"),
        ("tpm", 2**31, "1000000000"),  # past PostgreSQL's int4 column
        ("max_concurrent", 2**63, "1000000000"),
        ("daily_tokens", 2**63, "1000000000000000"),  # past SQLite's and PostgreSQL's int8
        ("daily_tokens", 2**53 + 1, "1000000000000000"),  # past the exact doubles of Redis's Lua
    ],
)
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
    resp = post_raw(
        gateway, "/admin/accounts/scored/verdict", f'{{"level": "watch", "score": {raw_score}}}'
    )
    err = error_of(resp)
    assert err["param"] == "score"
    assert (
        admin(gateway, "GET", "/admin/verdicts", params={"account": "scored"}).json()["data"] == []
    )


def test_verdict_listing_survives_a_non_finite_score_already_stored(gateway):
    """A row written before scores were checked (or by a detector that overflowed) must not turn
    every later listing into a 500: the score reads back as null."""
    engine = make_engine(gateway[1])
    try:
        with engine.begin() as conn:
            for score in (float("inf"), float("-inf"), float("nan")):
                conn.execute(
                    insert(Verdict).values(
                        ts=1.0,
                        account_id="overflowed",
                        level=1,
                        score=score,
                        reasons=["old row"],
                        source="offline",
                    )
                )
    finally:
        engine.dispose()
    for params in ({"account": "overflowed"}, {}):
        resp = admin(gateway, "GET", "/admin/verdicts", params=params)
        assert resp.status_code == 200, resp.text
    rows = admin(gateway, "GET", "/admin/verdicts", params={"account": "overflowed"}).json()["data"]
    assert [r["score"] for r in rows] == [None, None, None]
    ok = admin(
        gateway, "POST", "/admin/accounts/overflowed/verdict", json={"level": "ok", "score": 0.5}
    )
    assert ok.status_code == 201 and ok.json()["score"] == 0.5


# --- account names -------------------------------------------------------------------------------

BAD_NAMES = [
    "a\u0000b",
    "a/b",
    "tab\there",
    "bell\u0007",
    "new\nline",
    " padded",
    "",
    "x" * 129,
    "é",
]


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
    err = error_of(
        admin(gateway, "POST", f"/admin/accounts/{name}/verdict", json={"level": "watch"})
    )
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
    proc = run_cli(
        "keys", "create", "--account", "ok-name", "--rpm", str(10**30), "--db", gateway[1], "--json"
    )
    assert proc.returncode == 2 and "1000000000" in proc.stderr
    assert (
        json.loads(
            run_cli("keys", "create", "--account", "ok-name", "--db", gateway[1], "--json").stdout
        )["account"]
        == "ok-name"
    )


# --- key expiry, rotation, model allowlists ------------------------------------------------------


def new_key(gw, account: str, **fields) -> dict:
    made = admin(gw, "POST", "/admin/keys", json={"account": account, **fields})
    assert made.status_code == 201, made.text
    return made.json()


def chat(gw, key: str, model: str = "tiny") -> httpx.Response:
    return httpx.post(
        f"{gw[0]}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    )


def test_rotation_keeps_both_keys_working_for_the_grace_period_then_only_the_new(gateway):
    old = new_key(gateway, "rotor", rpm=100, models=["tiny"], name="ci")
    assert chat(gateway, old["key"]).status_code == 200
    rotated = admin(gateway, "POST", f"/admin/keys/{old['id']}/rotate", json={"grace_s": 3600})
    assert rotated.status_code == 201, rotated.text
    new = rotated.json()
    assert (new["account"], new["rpm"], new["models"], new["name"], new["rotated_from"]) == (
        "rotor",
        100,
        ["tiny"],
        "ci",
        old["id"],
    )
    assert new["replaces"]["id"] == old["id"] and new["replaces"]["expires_at"] is not None
    assert (
        chat(gateway, old["key"]).status_code == 200
        and chat(gateway, new["key"]).status_code == 200
    )
    # ending the grace period now: the old key is refused with a clear reason
    ended = admin(gateway, "POST", f"/admin/keys/{old['id']}/rotate", json={"grace_s": 0})
    assert ended.status_code == 201
    err = error_of(chat(gateway, old["key"]), 401)
    assert (
        err["code"] == "expired_api_key"
        and old["id"] in err["message"]
        and "expired at" in err["message"]
    )
    assert chat(gateway, new["key"]).status_code == 200
    with openai.OpenAI(base_url=gateway[0] + "/v1", api_key=old["key"], max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError, match="expired"):
            client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "x"}]
            )
    listed = {
        k["id"]: k
        for k in admin(gateway, "GET", "/admin/keys", params={"account": "rotor"}).json()["data"]
    }
    assert listed[old["id"]]["expired"] is True and listed[ended.json()["id"]]["expired"] is False


def test_a_key_created_with_an_expiry_stops_at_it(gateway):
    key = new_key(gateway, "brief", expires_in_s=1)
    assert key["expires_at"] is not None and key["expired"] is False
    assert chat(gateway, key["key"]).status_code == 200
    deadline = time.monotonic() + 30
    while (resp := chat(gateway, key["key"])).status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert error_of(resp, 401)["code"] == "expired_api_key"


@pytest.mark.parametrize(
    "path,body,status,param",
    [
        ("/admin/keys/key_nope/rotate", {}, 404, "key_id"),
        ("/admin/keys/{id}/rotate", {"grace_s": 10**12}, 400, "grace_s"),
        ("/admin/keys/{id}/rotate", {"grace_s": -1}, 400, "grace_s"),
        ("/admin/keys/{id}/rotate", {"grace": 5}, 400, "grace"),
        ("/admin/keys", {"account": "t", "expires_in_s": 0}, 400, "expires_in_s"),
        ("/admin/keys", {"account": "t", "models": []}, 400, "models"),
        ("/admin/keys", {"account": "t", "models": ["x" * 300]}, 400, "models"),
    ],
)
def test_bad_rotation_and_expiry_requests_are_4xx(gateway, path, body, status, param):
    key = new_key(gateway, "spinner")
    err = error_of(admin(gateway, "POST", path.format(id=key["id"]), json=body), status)
    assert err["param"] is not None and err["param"].startswith(param)


def test_a_revoked_key_cannot_be_rotated(gateway):
    key = new_key(gateway, "gone")
    admin(gateway, "DELETE", f"/admin/keys/{key['id']}")
    err = error_of(admin(gateway, "POST", f"/admin/keys/{key['id']}/rotate", json={}))
    assert "revoked" in err["message"]


def test_a_key_restricted_to_other_models_gets_404_model_not_found(gateway):
    allowed = new_key(gateway, "narrow", models=["tiny"])
    assert chat(gateway, allowed["key"]).status_code == 200
    elsewhere = new_key(gateway, "narrow", models=["gpt-4o", "other"])
    err = error_of(chat(gateway, elsewhere["key"]), 404)
    assert (err["code"], err["param"], err["type"]) == (
        "model_not_found",
        "model",
        "invalid_request_error",
    )
    assert err["message"] == "The model `tiny` does not exist or you do not have access to it."
    with openai.OpenAI(
        base_url=gateway[0] + "/v1", api_key=elsewhere["key"], max_retries=0
    ) as client:
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "x"}]
            )
    usage = admin(gateway, "GET", "/admin/accounts/narrow/usage").json()
    assert {k["id"]: k["live"]["requests"] for k in usage["keys"]}[
        elsewhere["id"]
    ] == 0  # nothing reserved


def test_cli_rotates_and_lists_expiry(gateway):
    made = json.loads(
        run_cli(
            "keys", "create", "--account", "clirot", "--model", "tiny", "--db", gateway[1], "--json"
        ).stdout
    )
    proc = run_cli("keys", "rotate", made["id"], "--grace", "0", "--db", gateway[1], "--json")
    assert proc.returncode == 0, proc.stderr
    new = json.loads(proc.stdout)
    assert (
        new["rotated_from"] == made["id"]
        and new["models"] == ["tiny"]
        and "stops working" in proc.stderr
    )
    assert chat(gateway, new["key"]).status_code == 200
    listed = [
        json.loads(line)
        for line in run_cli(
            "keys", "list", "--account", "clirot", "--db", gateway[1], "--json"
        ).stdout.splitlines()
    ]
    assert [k["expired"] for k in listed] == [True, False]
    bad = run_cli("keys", "rotate", new["id"], "--grace", "1y", "--db", gateway[1])
    assert bad.returncode == 2 and "--grace '1y' is not a duration" in bad.stderr


def test_a_restricted_key_cannot_replay_a_sibling_keys_idempotent_answer(gateway):
    # Idempotency-Keys are scoped to the account, so a sibling key's stored answer is there to
    # replay: the model allowlist must refuse before the replay, as it does before a generation.
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    wide, narrow = new_key(gateway, "siblings"), new_key(gateway, "siblings", models=["other"])

    def send(key: str) -> httpx.Response:
        return httpx.post(
            f"{gateway[0]}/v1/chat/completions",
            json=body,
            timeout=60,
            headers={"Authorization": f"Bearer {key}", "Idempotency-Key": "shared-1"},
        )

    assert send(wide["key"]).status_code == 200
    assert send(wide["key"]).headers.get("Idempotent-Replayed") == "true"
    refused = send(narrow["key"])
    assert "Idempotent-Replayed" not in refused.headers
    assert error_of(refused, 404)["code"] == "model_not_found"
