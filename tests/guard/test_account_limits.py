"""Limits per account hold over all its keys, on real gateways: across two replicas sharing one
ledger and one Redis, and for the daily dollar budget at the server's prices."""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import pytest

from tests.servers import run_cli, server_process

ADMIN = "admin-" + uuid.uuid4().hex
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}


def test_ten_keys_of_one_account_across_two_replicas_get_exactly_its_limit(tmp_path, redis_url):
    """Before account limits, ten keys with no limits of their own got 200 of 200: ten keys
    multiplied the account's budget tenfold."""
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    keys = []
    for _ in range(10):
        made = run_cli("keys", "create", "--account", "hydra", "--db", db, "--json")
        assert made.returncode == 0, made.stderr
        keys.append(json.loads(made.stdout)["key"])
    limited = run_cli("accounts", "set-limits", "hydra", "--rpm", "50", "--db", db)
    assert limited.returncode == 0, limited.stderr
    assert json.loads(limited.stdout)["rpm"] == 50
    args = ("--model", "tiny", "--db", db, "--redis", redis_url)
    with server_process(*args) as a, server_process(*args) as b:

        async def fire() -> list[httpx.Response]:
            async with httpx.AsyncClient(
                timeout=120, limits=httpx.Limits(max_connections=200)
            ) as client:
                return await asyncio.gather(
                    *(
                        client.post(
                            f"{(a, b)[i % 2].url}/v1/chat/completions",
                            json=BODY,
                            headers={"Authorization": f"Bearer {keys[i % 10]}"},
                        )
                        for i in range(200)
                    )
                )

        replies = asyncio.run(fire())
    codes = [r.status_code for r in replies]
    assert codes.count(200) == 50, sorted(set(codes))
    assert codes.count(429) == 150
    refused = next(r for r in replies if r.status_code == 429).json()["error"]
    assert refused["code"] == "rate_limit_exceeded" and "account 'hydra'" in refused["message"]
    assert {keys[i % 10] for i, r in enumerate(replies) if r.status_code == 200} != {keys[0]}


@pytest.fixture(scope="module")
def priced(tmp_path_factory):
    """A gateway where tiny costs $1000 per 1M prompt tokens and $2000 per 1M completion tokens
    (a tenth and a fifth of a cent per token: budgets of cents in a test)."""
    db = f"sqlite:///{tmp_path_factory.mktemp('priced') / 'ledger.db'}"
    env = {
        "DISTILLGUARD_ADMIN_KEY": ADMIN,
        "DISTILLGUARD_PRICES": json.dumps({"tiny": {"prompt": 1000, "completion": 2000}}),
    }
    with server_process("--model", "tiny", "--db", db, env=env) as server:
        yield server.url


def admin(url: str, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(
        method, url + path, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60, **kw
    )


def chat(url: str, key: str, **extra) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        json={**BODY, **extra},
        headers={"Authorization": f"Bearer {key}"},
        timeout=120,
    )


def test_daily_usd_budget_of_an_account_is_charged_at_the_servers_prices(priced):
    resp = admin(priced, "PUT", "/admin/accounts/spender/limits", json={"daily_usd": 0.1})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {
        "account": "spender",
        "rpm": None,
        "tpm": None,
        "max_concurrent": None,
        "daily_tokens": None,
        "daily_usd": 0.1,
    }
    keys = [
        admin(priced, "POST", "/admin/keys", json={"account": "spender"}).json()["key"]
        for _ in range(3)
    ]

    # A request that can cost more than the whole budget is a 400, not a 429 to retry forever.
    too_big = chat(priced, keys[0], max_tokens=60)
    assert too_big.status_code == 400 and too_big.json()["error"]["code"] == "request_too_large"

    spent, codes = 0.0, []
    for i in range(40):
        r = chat(priced, keys[i % 3], max_tokens=2)
        codes.append(r.status_code)
        if r.status_code == 200:
            u = r.json()["usage"]
            spent += (u["prompt_tokens"] * 1000 + u["completion_tokens"] * 2000) / 1e6
        else:
            err = r.json()["error"]
            assert r.status_code == 429 and err["code"] == "rate_limit_exceeded", r.text
            assert "US dollars per day" in err["message"] and "account 'spender'" in err["message"]
            assert "00:00 UTC" in err["message"]
            break
    assert codes[-1] == 429 and codes.count(200) >= 2
    usage = admin(priced, "GET", "/admin/accounts/spender/usage").json()
    assert usage["limits"]["daily_usd"] == 0.1
    # settled at the actual tokens' price, to the micro-dollar (each request rounds up once)
    assert abs(usage["live"]["usd_today"] - spent) <= 1e-6 * codes.count(200)
    assert usage["live"]["usd_today"] <= 0.1
    assert sum(k["live"]["usd_today"] for k in usage["keys"]) == pytest.approx(
        usage["live"]["usd_today"]
    )


def test_account_limits_set_by_the_admin_api_hold_over_new_keys_at_once(priced):
    keys = [
        admin(priced, "POST", "/admin/keys", json={"account": "capped"}).json()["key"]
        for _ in range(4)
    ]
    assert all(chat(priced, k).status_code == 200 for k in keys)  # unlimited until now
    assert (
        admin(
            priced,
            "PUT",
            "/admin/accounts/capped/limits",
            json={"daily_tokens": 10**15, "max_concurrent": 3},
        ).status_code
        == 200
    )
    assert admin(priced, "PUT", "/admin/accounts/capped/limits", json={"rpm": 5}).status_code == 200
    codes = [chat(priced, keys[i % 4]).status_code for i in range(8)]
    assert codes == [200] + [429] * 7  # 4 earlier requests count toward the window
    limits = admin(priced, "GET", "/admin/accounts/capped/usage").json()["limits"]
    assert limits == {
        "rpm": 5,
        "tpm": None,
        "max_concurrent": None,
        "daily_tokens": None,
        "daily_usd": None,
    }


@pytest.mark.parametrize(
    "body,param",
    [
        ({"rpm": 10**30}, "rpm"),
        ({"daily_usd": 10**10}, "daily_usd"),
        ({"daily_usd": 0}, "daily_usd"),
        ({"daily_usd": "5"}, "daily_usd"),
        ({"burst": 5}, "burst"),
    ],
)
def test_bad_account_limits_are_a_400(priced, body, param):
    resp = admin(priced, "PUT", "/admin/accounts/fine/limits", json=body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param
    bad_name = admin(priced, "PUT", "/admin/accounts/a%00b/limits", json={"rpm": 5})
    assert bad_name.status_code == 400 and bad_name.json()["error"]["param"] == "account"


# --- the guard's admission, in process -----------------------------------------------------------


def guarded(tmp_path, **config):
    from distillguard.guard.gateway import Guard, GuardConfig

    return Guard(
        GuardConfig(
            db=f"sqlite:///{tmp_path / 'g.db'}", watermark=False, verdict_cache_ttl_s=0, **config
        )
    )


def test_a_model_without_a_price_is_refused_only_where_a_dollar_budget_applies(tmp_path):
    from distillguard.errors import APIError
    from distillguard.guard.limits import Limits, Price

    async def scenario():
        guard = guarded(tmp_path, prices={"tiny": Price(prompt=1000, completion=2000)})
        await guard.start()
        try:
            budgeted, _ = guard.keys.create("budgeted")
            guard.keys.set_account_limits("budgeted", Limits(daily_usd=1.0))
            budgeted = guard.keys.get(budgeted.id)
            free, _ = guard.keys.create("free")
            with pytest.raises(APIError) as e:
                await guard.limits.admit(budgeted, 10, model="unpriced", prompt_tokens=4)
            assert (e.value.status_code, e.value.code) == (403, "model_not_priced")
            assert "'unpriced'" in e.value.message and "DISTILLGUARD_PRICES" in e.value.message
            await guard.limits.settle(
                await guard.limits.admit(free, 10, model="unpriced", prompt_tokens=4), 10, 4
            )

            # priced: 4 prompt tokens at $0.001 and 6 completion tokens at $0.002 reserved, then
            # settled to what was used (or kept as reserved when the split is unknown)
            lease = await guard.limits.admit(budgeted, 10, model="tiny", prompt_tokens=4)
            assert lease.lease.reserved_usd == pytest.approx(0.016)
            await guard.limits.settle(lease, 7, 4)
            assert (await guard.limiter.usage("budgeted"))["usd_today"] == pytest.approx(0.010)
            lease = await guard.limits.admit(budgeted, 10, model="tiny", prompt_tokens=4)
            await guard.limits.settle(lease, 7)
            assert (await guard.limiter.usage("budgeted"))["usd_today"] == pytest.approx(0.026)
        finally:
            await guard.close()

    asyncio.run(scenario())


def test_a_throttling_verdict_tightens_the_account_not_only_each_key(tmp_path):
    """Under 'suspect' each key gets throttle_rpm; without the account scope throttled too, ten
    keys would get ten times it."""
    from distillguard.errors import RateLimited

    async def scenario():
        guard = guarded(tmp_path)
        await guard.start()
        try:
            keys = [guard.keys.create("suspicious")[0] for _ in range(10)]
            await asyncio.to_thread(guard.policing.record, "suspicious", "suspect", source="admin")
            decision = await guard.policing.decide(keys[0])
            admitted = 0
            for i in range(100):
                try:
                    await guard.limits.admit(keys[i % 10], 1, decision)
                    admitted += 1
                except RateLimited:
                    pass
            return admitted, decision.throttle_rpm
        finally:
            await guard.close()

    admitted, throttle_rpm = asyncio.run(scenario())
    assert admitted == throttle_rpm
