"""Rate limits and quotas: exact under concurrency, in process and shared through a real Redis."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from distillguard.errors import ConfigError, InvalidRequestError, RateLimited
from distillguard.guard.limits import (
    DAY,
    Lease,
    Limits,
    MemoryLimiter,
    RedisLimiter,
    make_limiter,
)

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC


class FakeClock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def key() -> str:
    """A fresh API key id, so tests sharing the session's Redis never see each other."""
    return f"key-{uuid.uuid4().hex[:12]}"


@pytest_asyncio.fixture
async def make(redis_url):
    """make(kind, **options) -> a limiter of that kind, closed at the end of the test."""
    made = []

    def factory(kind: str, **options):
        if kind == "memory":
            limiter = MemoryLimiter(**options)
        else:
            limiter = RedisLimiter(redis_url, **options)
        made.append(limiter)
        return limiter

    yield factory
    for limiter in made:
        await limiter.close()


@pytest.fixture(params=["memory", "redis"])
def limiter(request, make):
    return make(request.param)


async def attempt(limiter, key, limits, tokens=0) -> Lease | RateLimited:
    try:
        return await limiter.acquire({key: limits}, tokens)
    except RateLimited as e:
        return e


async def attempt_scopes(limiter, scopes, tokens=0, usd=0.0) -> Lease | RateLimited:
    try:
        return await limiter.acquire(scopes, tokens, usd=usd)
    except RateLimited as e:
        return e


def leases(results) -> list[Lease]:
    return [r for r in results if isinstance(r, Lease)]


# --- exact under concurrency ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_200_simultaneous_acquires_against_rpm_50_admit_exactly_50(limiter, key):
    limits = Limits(rpm=50)
    results = await asyncio.gather(*(attempt(limiter, key, limits) for _ in range(200)))
    assert len(leases(results)) == 50
    refused = [r for r in results if isinstance(r, RateLimited)]
    assert len(refused) == 150 and all(e.limit == "rpm" for e in refused)
    assert (await limiter.usage(key))["requests"] == 50


@pytest.mark.asyncio
async def test_200_simultaneous_acquires_against_max_concurrent_50(limiter, key):
    limits = Limits(max_concurrent=50)
    results = await asyncio.gather(*(attempt(limiter, key, limits) for _ in range(200)))
    held = leases(results)
    assert len(held) == 50
    assert {e.limit for e in results if isinstance(e, RateLimited)} == {"concurrency"}
    assert (await limiter.usage(key))["in_flight"] == 50
    # a slot frees as soon as a request finishes
    await limiter.release(held[0], 0)
    again = await asyncio.gather(*(attempt(limiter, key, limits) for _ in range(10)))
    assert len(leases(again)) == 1
    assert (await limiter.usage(key))["in_flight"] == 50


@pytest.mark.asyncio
async def test_200_simultaneous_reservations_against_tpm(limiter, key):
    limits = Limits(tpm=5_000)
    results = await asyncio.gather(*(attempt(limiter, key, limits, 100) for _ in range(200)))
    assert len(leases(results)) == 50
    assert {e.limit for e in results if isinstance(e, RateLimited)} == {"tpm"}
    assert (await limiter.usage(key))["tokens"] == 5_000


@pytest.mark.asyncio
async def test_two_replicas_with_separate_pools_share_one_limit(make, key):
    a, b = make("redis"), make("redis")
    limits = Limits(rpm=50)
    results = await asyncio.gather(
        *(attempt(limiter, key, limits) for _ in range(100) for limiter in (a, b))
    )
    assert len(leases(results)) == 50
    assert (await a.usage(key))["requests"] == (await b.usage(key))["requests"] == 50


_REPLICA = textwrap.dedent(
    """
    import asyncio, json, sys
    import redis.asyncio as aioredis
    from distillguard.errors import RateLimited
    from distillguard.guard.limits import Limits, RedisLimiter

    async def main(url, key, go):
        limiter = RedisLimiter(url)
        signal = aioredis.from_url(url)
        try:
            # load the scripts and open the pool's 50 connections before the start signal
            await asyncio.gather(*(limiter.usage(key) for _ in range(50)))
            print("ready", flush=True)
            await signal.blpop([go], timeout=30)

            async def one():
                try:
                    await limiter.acquire({key: Limits(rpm=50)}, 1)
                    return 1
                except RateLimited:
                    return 0

            print(json.dumps(sum(await asyncio.gather(*(one() for _ in range(100))))), flush=True)
        finally:
            await signal.aclose()
            await limiter.close()

    asyncio.run(main(*sys.argv[1:]))
    """
)


@pytest.mark.asyncio
async def test_two_replica_processes_admit_exactly_50_in_total(redis_url, key):
    go = f"{key}:go"
    src = str(Path(__file__).resolve().parents[2] / "src")
    path = os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _REPLICA,
            redis_url,
            key,
            go,
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        for _ in range(2)
    ]
    try:
        for p in procs:
            assert (await asyncio.wait_for(p.stdout.readline(), 30)).strip() == b"ready"
        signal = aioredis.from_url(redis_url)
        try:
            await signal.rpush(go, 1, 1)  # both processes start firing at once
        finally:
            await signal.aclose()
        outputs = [await asyncio.wait_for(p.communicate(), 30) for p in procs]
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
    assert [p.returncode for p in procs] == [0, 0]
    admitted = [json.loads(out) for out, _ in outputs]
    assert sum(admitted) == 50, admitted


# --- reserve, settle, refuse ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_release_settles_the_reservation(limiter, key):
    limits = Limits(tpm=100, daily_tokens=1_000)
    lease = await limiter.acquire({key: limits}, 100)
    assert lease.reserved_tokens == 100
    with pytest.raises(RateLimited):
        await limiter.acquire({key: limits}, 70)
    await limiter.release(lease, 30)
    usage = await limiter.usage(key)
    assert usage == {
        "requests": 1,
        "tokens": 30,
        "tokens_today": 30,
        "usd_today": 0.0,
        "in_flight": 0,
    }
    await limiter.acquire({key: limits}, 70)  # 30 + 70 fits now
    usage = await limiter.usage(key)
    assert (usage["tokens"], usage["tokens_today"], usage["in_flight"]) == (100, 100, 1)


@pytest.mark.asyncio
async def test_release_twice_is_a_no_op(limiter, key):
    lease = await limiter.acquire({key: Limits()}, 50)
    await limiter.release(lease, 20)
    await limiter.release(lease, 5)
    usage = await limiter.usage(key)
    assert usage == {
        "requests": 1,
        "tokens": 20,
        "tokens_today": 20,
        "usd_today": 0.0,
        "in_flight": 0,
    }


@pytest.mark.asyncio
async def test_refused_request_records_nothing(limiter, key):
    limits = Limits(rpm=2, tpm=100, max_concurrent=5, daily_tokens=1_000)
    await limiter.acquire({key: limits}, 60)
    before = await limiter.usage(key)
    for _ in range(5):
        with pytest.raises(RateLimited) as e:
            await limiter.acquire({key: limits}, 60)
        assert e.value.limit == "tpm"
    assert (
        await limiter.usage(key)
        == before
        == {"requests": 1, "tokens": 60, "tokens_today": 60, "usd_today": 0.0, "in_flight": 1}
    )
    await limiter.acquire({key: limits}, 40)  # the refused requests did not use up the rpm


@pytest.mark.asyncio
async def test_keys_are_independent(limiter, key):
    limits = Limits(rpm=1)
    await limiter.acquire({key: limits}, 0)
    with pytest.raises(RateLimited):
        await limiter.acquire({key: limits}, 0)
    await limiter.acquire({key + "-other": limits}, 0)


@pytest.mark.asyncio
async def test_no_limits_means_unlimited_but_usage_is_counted(limiter, key):
    held = await asyncio.gather(*(limiter.acquire({key: Limits()}, 1_000) for _ in range(300)))
    assert len(held) == 300
    assert await limiter.usage(key) == {
        "requests": 300,
        "tokens": 300_000,
        "tokens_today": 300_000,
        "usd_today": 0.0,
        "in_flight": 300,
    }


@pytest.mark.asyncio
async def test_request_that_can_never_fit_is_a_400_not_a_429(limiter, key):
    for limits in (Limits(tpm=1_000), Limits(daily_tokens=1_000)):
        with pytest.raises(InvalidRequestError) as e:
            await limiter.acquire({key: limits}, 1_001)
        assert e.value.status_code == 400
        assert (e.value.code, e.value.param) == ("request_too_large", "max_tokens")
        assert "1001" in e.value.message and "1000" in e.value.message
    assert (await limiter.usage(key))["requests"] == 0
    # exactly the limit fits
    await limiter.acquire({key: Limits(tpm=1_000, daily_tokens=1_000)}, 1_000)


@pytest.mark.asyncio
async def test_daily_quota(limiter, key):
    limits = Limits(daily_tokens=1_000)
    await limiter.acquire({key: limits}, 600)
    with pytest.raises(RateLimited) as e:
        await limiter.acquire({key: limits}, 500)
    err = e.value
    assert (err.limit, err.type, err.status_code) == ("daily_tokens", "tokens", 429)
    to_midnight = DAY - time.time() % DAY
    assert abs(err.retry_after - to_midnight) <= 5
    assert "tokens per day" in err.message and "1000" in err.message and "00:00 UTC" in err.message
    await limiter.acquire({key: limits}, 400)
    assert (await limiter.usage(key))["tokens_today"] == 1_000


@pytest.mark.asyncio
async def test_rate_limited_error_has_openai_shape_and_retry_after(limiter, key):
    limits = Limits(rpm=1)
    await limiter.acquire({key: limits}, 0)
    with pytest.raises(RateLimited) as e:
        await limiter.acquire({key: limits}, 0)
    err = e.value
    assert err.status_code == 429
    assert 59 <= err.retry_after <= 60
    assert err.headers == {"Retry-After": str(err.retry_after)}
    body = err.to_dict()["error"]
    assert (body["type"], body["code"]) == ("requests", "rate_limit_exceeded")
    assert "requests per minute (RPM): limit 1, used 1" in body["message"]
    assert f"try again in {err.retry_after}s" in body["message"]


@pytest.mark.asyncio
async def test_concurrency_refusal_says_retry_in_1s(limiter, key):
    await limiter.acquire({key: Limits(max_concurrent=1)}, 0)
    with pytest.raises(RateLimited) as e:
        await limiter.acquire({key: Limits(max_concurrent=1)}, 0)
    assert (e.value.limit, e.value.type, e.value.retry_after) == ("concurrency", "requests", 1)
    assert "concurrent requests: limit 1, in flight 1" in e.value.message


@pytest.mark.asyncio
async def test_refusal_reports_the_limit_that_frees_last(limiter, key):
    limits = Limits(rpm=1, max_concurrent=1, daily_tokens=10)
    await limiter.acquire({key: limits}, 10)
    with pytest.raises(RateLimited) as e:
        await limiter.acquire({key: limits}, 1)
    assert e.value.limit == "daily_tokens"  # concurrency frees in 1 s, rpm in 60 s, daily at 00:00


# --- an account over its keys ------------------------------------------------------------------


def key_scopes(account: str, n: int = 10) -> list[str]:
    return [f"{account}/key_{i}" for i in range(n)]


@pytest.mark.parametrize(
    "name,value,tokens,usd",
    [
        ("rpm", 50, 0, 0.0),
        ("tpm", 5_000, 100, 0.0),
        ("max_concurrent", 50, 0, 0.0),
        ("daily_tokens", 5_000, 100, 0.0),
        ("daily_usd", 0.5, 0, 0.01),
    ],
)
@pytest.mark.asyncio
async def test_ten_keys_of_one_account_together_get_exactly_its_limit(
    limiter, key, name, value, tokens, usd
):
    """200 racing requests over ten keys, none of which is limited itself: 50 pass, whichever
    of the account's limits it is."""
    account = Limits(**{name: value})
    results = await asyncio.gather(
        *(
            attempt_scopes(limiter, {scope: Limits(), key: account}, tokens, usd)
            for _ in range(20)
            for scope in key_scopes(key)
        )
    )
    assert len(leases(results)) == 50
    refused = [r for r in results if isinstance(r, RateLimited)]
    expected = "concurrency" if name == "max_concurrent" else name
    assert len(refused) == 150 and {e.limit for e in refused} == {expected}
    assert f"account {key!r}" in refused[0].message
    usage = await limiter.usage(key)
    assert (usage["requests"], usage["in_flight"], usage["tokens_today"]) == (50, 50, 50 * tokens)
    assert usage["usd_today"] == pytest.approx(50 * usd)
    per_key = [await limiter.usage(scope) for scope in key_scopes(key)]
    assert sum(u["requests"] for u in per_key) == 50


@pytest.mark.parametrize("account_rpm,admitted", [(25, 25), (100, 30)])
@pytest.mark.asyncio
async def test_key_limits_hold_within_the_account(limiter, key, account_rpm, admitted):
    scopes = key_scopes(key, 3)
    results = await asyncio.gather(
        *(
            attempt_scopes(limiter, {scope: Limits(rpm=10), key: Limits(rpm=account_rpm)}, 0)
            for _ in range(20)
            for scope in scopes
        )
    )
    assert len(leases(results)) == admitted  # whichever binds first: the account or each key
    counts = [(await limiter.usage(scope))["requests"] for scope in scopes]
    assert max(counts) <= 10 and sum(counts) == admitted == (await limiter.usage(key))["requests"]


@pytest.mark.asyncio
async def test_a_refusal_by_either_scope_records_nothing_in_the_other(limiter, key):
    k1, k2 = key_scopes(key, 2)
    await limiter.acquire({k1: Limits(rpm=1), key: Limits(rpm=2)}, 5)
    with pytest.raises(RateLimited) as e:  # the key is out; the account is not
        await limiter.acquire({k1: Limits(rpm=1), key: Limits(rpm=2)}, 5)
    assert f"key 'key_0' of account {key!r}" in e.value.message
    assert (await limiter.usage(key))["requests"] == 1
    await limiter.acquire({k2: Limits(), key: Limits(rpm=2)}, 5)
    with pytest.raises(RateLimited) as e:  # now the account is out; k2 itself is not
        await limiter.acquire({k2: Limits(), key: Limits(rpm=2)}, 5)
    assert f"for account {key!r}" in e.value.message
    assert (await limiter.usage(k2))["requests"] == 1


@pytest.mark.asyncio
async def test_release_settles_every_scope_in_tokens_and_dollars(limiter, key):
    k1 = f"{key}/key_1"
    scopes = {k1: Limits(daily_tokens=1_000), key: Limits(daily_usd=1.0)}
    lease = await limiter.acquire(scopes, 500, usd=0.6)
    assert (lease.scopes, lease.reserved_tokens, lease.reserved_usd) == ((k1, key), 500, 0.6)
    with pytest.raises(RateLimited) as e:
        await limiter.acquire(scopes, 1, usd=0.5)
    assert (
        e.value.limit == "daily_usd" and "US dollars per day (UTC): limit $1.00" in e.value.message
    )
    assert abs(e.value.retry_after - (DAY - time.time() % DAY)) <= 5
    await limiter.release(lease, 120, 0.15)
    for scope in (k1, key):
        usage = await limiter.usage(scope)
        assert (usage["tokens"], usage["tokens_today"], usage["in_flight"]) == (120, 120, 0)
        assert usage["usd_today"] == pytest.approx(0.15)
    await limiter.acquire(scopes, 1, usd=0.85)  # 0.15 + 0.85 is exactly the budget
    with pytest.raises(RateLimited):
        await limiter.acquire(scopes, 1, usd=0.000001)


@pytest.mark.asyncio
async def test_release_without_dollars_keeps_them_charged_as_reserved(limiter, key):
    lease = await limiter.acquire({key: Limits(daily_usd=1.0)}, 10, usd=0.25)
    await limiter.release(lease, 4)
    assert (await limiter.usage(key))["usd_today"] == pytest.approx(0.25)


@pytest.mark.asyncio
async def test_a_request_over_the_daily_budget_on_its_own_is_a_400(limiter, key):
    with pytest.raises(InvalidRequestError) as e:
        await limiter.acquire({f"{key}/k": Limits(), key: Limits(daily_usd=0.01)}, 10, usd=0.02)
    assert (e.value.code, e.value.param) == ("request_too_large", "max_tokens")
    assert "$0.020000" in e.value.message and f"account {key!r}" in e.value.message
    assert (await limiter.usage(key))["requests"] == 0


@pytest.mark.asyncio
async def test_scopes_of_two_accounts_in_one_request_are_refused(limiter, key):
    with pytest.raises(ValueError, match="different accounts"):
        await limiter.acquire({f"{key}/k": Limits(), f"{key}-other": Limits()}, 1)


# --- windows and leases in time ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_sliding_window_not_fixed_buckets():
    clock = FakeClock()
    limiter = MemoryLimiter(clock=clock)
    limits = Limits(rpm=2)
    await limiter.acquire({"k": limits}, 0)  # t = 0
    clock.advance(59)
    await limiter.acquire({"k": limits}, 0)  # t = 59
    clock.advance(0.999)
    with pytest.raises(RateLimited) as e:  # t = 59.999: both still count
        await limiter.acquire({"k": limits}, 0)
    assert e.value.retry_after == 1
    clock.advance(0.001)
    await limiter.acquire({"k": limits}, 0)  # t = 60: the request from t = 0 has left the window
    clock.advance(1)
    with pytest.raises(RateLimited) as e:  # t = 61: 59 and 60 count; 59 leaves at 119
        await limiter.acquire({"k": limits}, 0)
    assert e.value.retry_after == 58
    # never more than rpm requests in any 60 s interval, whatever the phase
    assert (await limiter.usage("k"))["requests"] == 2


@pytest.mark.asyncio
async def test_tpm_retry_after_is_when_enough_tokens_expire():
    clock = FakeClock()
    limiter = MemoryLimiter(clock=clock)
    limits = Limits(tpm=1_000)
    for tokens in (300, 300, 300):  # at t = 0, 10, 20
        await limiter.acquire({"k": limits}, tokens)
        clock.advance(10)
    # t = 30: 900 used; 500 more fit once 400 have expired: the first two entries, at t = 70
    with pytest.raises(RateLimited) as e:
        await limiter.acquire({"k": limits}, 500)
    assert (e.value.limit, e.value.type, e.value.retry_after) == ("tpm", "tokens", 40)
    assert "tokens per minute (TPM): limit 1000, used 900, requested 500" in e.value.message
    clock.advance(39.5)
    with pytest.raises(RateLimited) as e:
        await limiter.acquire({"k": limits}, 500)
    assert e.value.retry_after == 1
    clock.advance(0.5)
    await limiter.acquire({"k": limits}, 500)
    assert (await limiter.usage("k"))["tokens"] == 800


@pytest.mark.asyncio
async def test_settled_tokens_leave_the_window_with_their_entry():
    clock = FakeClock()
    limiter = MemoryLimiter(clock=clock)
    lease = await limiter.acquire({"k": Limits(tpm=100)}, 100)
    clock.advance(30)
    await limiter.release(lease, 40)
    assert (await limiter.usage("k"))["tokens"] == 40
    clock.advance(30)
    assert (await limiter.usage("k"))["tokens"] == 0
    assert (await limiter.usage("k"))["tokens_today"] == 40


@pytest.mark.asyncio
async def test_daily_quota_resets_at_utc_midnight():
    midnight = 19_700 * DAY
    clock = FakeClock(midnight - 100)
    limiter = MemoryLimiter(clock=clock)
    limits = Limits(daily_tokens=1_000)
    lease = await limiter.acquire({"k": limits}, 1_000)
    with pytest.raises(RateLimited) as e:
        await limiter.acquire({"k": limits}, 1)
    assert e.value.retry_after == 100
    clock.advance(100)
    late = await limiter.acquire({"k": limits}, 900)  # a new day
    await limiter.release(lease, 10)  # settling yesterday's lease leaves today's count alone
    assert (await limiter.usage("k"))["tokens_today"] == 900
    await limiter.release(late, 500)
    assert (await limiter.usage("k"))["tokens_today"] == 500


@pytest.mark.asyncio
async def test_lease_ttl_frees_the_slot_of_a_lease_never_released():
    clock = FakeClock()
    limiter = MemoryLimiter(clock=clock, lease_ttl=600)
    limits = Limits(max_concurrent=1)
    lease = await limiter.acquire({"k": limits}, 10)
    assert lease.expires_at == lease.acquired_at + 600
    clock.advance(599)
    with pytest.raises(RateLimited):
        await limiter.acquire({"k": limits}, 0)
    clock.advance(1)
    await limiter.acquire({"k": limits}, 0)
    assert (await limiter.usage("k"))["in_flight"] == 1


@pytest.mark.asyncio
async def test_redis_window_slides(make, key):
    limiter = make("redis", window=2.0)
    limits = Limits(rpm=2)
    first = await limiter.acquire({key: limits}, 0)
    await asyncio.sleep(1.0)
    await limiter.acquire({key: limits}, 0)
    with pytest.raises(RateLimited) as e:
        await limiter.acquire({key: limits}, 0)
    assert e.value.retry_after == 1  # the first request leaves the window in ~1 s
    assert "requests per 2 s (RPM)" in e.value.message
    await asyncio.sleep(max(0.0, first.acquired_at + 2.05 - time.time()))
    await limiter.acquire({key: limits}, 0)  # only the first one has left the window
    with pytest.raises(RateLimited):  # the second one counts until ~3 s
        await limiter.acquire({key: limits}, 0)
    await asyncio.sleep(2.1)
    assert (await limiter.usage(key))["requests"] == 0


@pytest.mark.asyncio
async def test_redis_lease_ttl_frees_slots_of_a_crashed_replica(make, key):
    crashed, alive = make("redis", lease_ttl=0.3), make("redis", lease_ttl=0.3)
    limits = Limits(max_concurrent=2)
    await crashed.acquire({key: limits}, 10)
    await crashed.acquire({key: limits}, 10)  # never released
    with pytest.raises(RateLimited):
        await alive.acquire({key: limits}, 0)
    await asyncio.sleep(0.4)
    await alive.acquire({key: limits}, 0)
    usage = await alive.usage(key)
    assert (usage["in_flight"], usage["tokens_today"]) == (1, 20)  # tokens stay charged as reserved


@pytest.mark.asyncio
async def test_redis_reloads_scripts_after_script_flush(make, redis_url, key):
    limiter = make("redis")
    await limiter.acquire({key: Limits(rpm=5)}, 1)
    admin = aioredis.from_url(redis_url)
    try:
        await admin.script_flush()
    finally:
        await admin.aclose()
    await limiter.acquire({key: Limits(rpm=5)}, 1)
    assert (await limiter.usage(key))["requests"] == 2


# --- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", [{"rpm": 0}, {"tpm": -1}, {"max_concurrent": 1.5}, {"daily_tokens": True}]
)
def test_limits_reject_non_positive_integers(bad):
    with pytest.raises(ConfigError, match="positive integer"):
        Limits(**bad)


@pytest.mark.parametrize(
    "bad,fragment",
    [
        ({"rpm": 10**30}, "up to 1000000000,"),
        ({"tpm": 2**31}, "up to 1000000000,"),
        ({"max_concurrent": 10**9 + 1}, "up to 1000000000,"),
        ({"daily_tokens": 2**63}, "up to 1000000000000000,"),
        ({"daily_usd": float("inf")}, "daily_usd=inf"),
        ({"daily_usd": float("nan")}, "daily_usd=nan"),
        ({"daily_usd": 0}, "above 0"),
        ({"daily_usd": 10**9 + 1}, "up to 1000000000"),
        ({"daily_usd": "5"}, "daily_usd='5'"),
    ],
)
def test_limits_are_bounded(bad, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("$", r"\$")):
        Limits(**bad)
    top = Limits(rpm=10**9, tpm=10**9, max_concurrent=10**9, daily_tokens=10**15, daily_usd=10**9)
    assert top.public()["daily_tokens"] == 10**15


@pytest.mark.asyncio
async def test_acquire_rejects_a_negative_token_count(limiter, key):
    with pytest.raises(ValueError, match="tokens=-1"):
        await limiter.acquire({key: Limits()}, -1)


@pytest.mark.asyncio
async def test_make_limiter(redis_url):
    memory = make_limiter(None)
    shared = make_limiter(redis_url, window=5.0)
    try:
        assert isinstance(memory, MemoryLimiter)
        assert isinstance(shared, RedisLimiter) and shared.window == 5.0
    finally:
        await memory.close()
        await shared.close()
