"""Rate limits and quotas per API key and per account: reserve before serving, settle after.

Five limits per scope (``None`` = unlimited):

- ``rpm``: requests in a rolling window (60 s by default),
- ``tpm``: tokens (prompt + completion) in the same rolling window,
- ``max_concurrent``: requests in flight,
- ``daily_tokens``: tokens per UTC day,
- ``daily_usd``: spend per UTC day, in US dollars (the caller prices each request).

A *scope* is a name that limits apply to: an account (``"acme"``) or one of its API keys
(``"acme/key_3f2a9c01b4d2"``). The gateway passes both scopes of a request to one ``acquire``:
limits on keys alone let an account multiply its budget by creating keys, so an account's
limits hold over all its keys together, and a key's within that. Account names cannot contain
``/`` (see ``keys.ACCOUNT_PATTERN``), so the account a scope belongs to is the part before it.

The gateway calls ``acquire`` before it serves a request, with an upper bound on the tokens the
request can use (prompt tokens + max completion tokens) and on its price. ``acquire`` checks
every limit of every scope and, only if all pass, records the request, reserves the tokens and
the dollars in each scope's window and today's quota and takes a concurrency slot in each, in one
atomic step. When the answer is done, ``release`` frees the slots and settles the reservations to
what was actually used. A key or an account therefore can never spend more than its budget,
however many requests race (spend recorded after the fact can be overrun by every request in
flight).

Windows are exact sliding windows: a request acquired at ``t`` counts until ``t + window``, so no
60 s interval ever holds more than ``rpm`` requests (fixed one-minute buckets let through 2x
``rpm`` around a bucket boundary). ``Retry-After`` is the time until enough of the window has
expired for the refused request to fit; for the daily quotas, until the next 00:00 UTC; for
concurrency, 1 s (a slot frees when any request finishes, which cannot be predicted).

A request whose reservation exceeds ``tpm``, ``daily_tokens`` or ``daily_usd`` on its own would
never fit, so it is refused with a 400 ``InvalidRequestError`` (code ``request_too_large``, param
``max_tokens``) rather than a 429: clients (the OpenAI SDK among them) retry 429s automatically,
and retrying this request can only fail again; the fix is a smaller ``max_tokens``.

Limits are bounded (``MAX_RATE``, ``MAX_DAILY_TOKENS``, ``MAX_DAILY_USD``) so that every count
fits the database's integer columns and stays exact in Redis's Lua, whose numbers are doubles
(exact integers up to 2^53); dollars are counted in whole micro-dollars for the same reason.

Two implementations of one ``Limiter`` protocol:

- ``MemoryLimiter``: one process, one event loop.
- ``RedisLimiter``: shared by any number of gateway replicas through one Redis. Each operation is
  one Lua script over every scope of the request, so check-and-record is atomic across replicas
  and across a key and its account, and scripts read the time from Redis (``TIME``) so replicas
  with skewed clocks agree on the windows and on the UTC day.
"""

from __future__ import annotations

import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from distillguard.errors import ConfigError, InvalidRequestError, RateLimited

__all__ = [
    "MAX_DAILY_TOKENS",
    "MAX_DAILY_USD",
    "MAX_RATE",
    "Lease",
    "Limiter",
    "Limits",
    "MemoryLimiter",
    "Price",
    "RateLimited",
    "RedisLimiter",
    "make_limiter",
    "scope_account",
]

DAY = 86_400  # seconds in a UTC day (POSIX time has no leap seconds)

# Bounds of the limits. rpm, tpm and max_concurrent are stored in 32-bit columns (PostgreSQL's
# int4 ends at 2^31 - 1); daily_tokens in a 64-bit one but counted in Redis's Lua doubles, exact
# to 2^53; daily_usd in micro-dollars, exact to 2^53 too. Round numbers under those: no real
# budget comes near them, and a value past them is a typo (or a probe), not a budget.
MAX_RATE = 10**9
MAX_DAILY_TOKENS = 10**15
MAX_DAILY_USD = 10**9
_BOUNDS = {
    "rpm": MAX_RATE,
    "tpm": MAX_RATE,
    "max_concurrent": MAX_RATE,
    "daily_tokens": MAX_DAILY_TOKENS,
}


@dataclass(frozen=True)
class Limits:
    """The limits of one API key or account. ``None`` means unlimited."""

    rpm: int | None = None  # requests per rolling window (60 s)
    tpm: int | None = None  # tokens (prompt + completion) per rolling window (60 s)
    max_concurrent: int | None = None  # requests in flight
    daily_tokens: int | None = None  # tokens per UTC day
    daily_usd: float | None = None  # US dollars per UTC day, at the server's prices

    def __post_init__(self):
        for name, bound in _BOUNDS.items():
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= bound:
                raise ConfigError(
                    f"Limits.{name}={value!r} is invalid: use a positive integer up to {bound}, or None "
                    "for unlimited (to block a key, revoke it instead of setting a limit of 0)"
                )
        usd = self.daily_usd
        if usd is not None and (
            isinstance(usd, bool)
            or not isinstance(usd, (int, float))
            or not math.isfinite(usd)
            or not 0 < usd <= MAX_DAILY_USD
        ):
            raise ConfigError(
                f"Limits.daily_usd={usd!r} is invalid: use a number of dollars above 0 and up to "
                f"{MAX_DAILY_USD}, or None for unlimited"
            )

    def public(self) -> dict:
        return {
            "rpm": self.rpm,
            "tpm": self.tpm,
            "max_concurrent": self.max_concurrent,
            "daily_tokens": self.daily_tokens,
            "daily_usd": self.daily_usd,
        }


@dataclass(frozen=True)
class Lease:
    """What ``acquire`` hands out and ``release`` takes back.

    Times are in seconds since the epoch, on the limiter's clock (Redis's clock for
    ``RedisLimiter``). After ``expires_at`` the concurrency slots free themselves even if the
    lease is never released (a crashed replica, a lost task); the tokens and dollars stay charged
    as reserved.
    """

    scopes: tuple[str, ...]
    lease_id: str
    reserved_tokens: int
    acquired_at: float
    expires_at: float
    reserved_usd: float = 0.0


class Limiter(Protocol):
    async def acquire(
        self, scopes: Mapping[str, Limits], tokens: int, *, usd: float = 0.0
    ) -> Lease:
        """Check every limit of every scope and, only if all pass, record one request, reserve
        ``tokens`` and ``usd`` (upper bounds) in each scope's window and today's quotas, and take
        a concurrency slot in each. The scopes must belong to one account (``scope_account``).

        Raises ``RateLimited`` (429) when a limit is exhausted, ``InvalidRequestError`` (400) when
        the reservation exceeds ``tpm``, ``daily_tokens`` or ``daily_usd`` on its own; nothing is
        recorded then.
        """
        ...

    async def release(
        self, lease: Lease, actual_tokens: int, actual_usd: float | None = None
    ) -> None:
        """Free the lease's concurrency slots and settle its reservation to ``actual_tokens`` and
        ``actual_usd`` (None: the dollars stay charged as reserved). Releasing twice is a no-op."""
        ...

    async def usage(self, scope: str) -> dict:
        """``{"requests", "tokens"}`` in the current window, ``"tokens_today"`` and
        ``"usd_today"`` (UTC) and ``"in_flight"``."""
        ...

    async def close(self) -> None: ...


class Price(BaseModel):
    """What one model costs, in US dollars per million tokens (as providers list prices)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: float = Field(ge=0, le=1e6, allow_inf_nan=False, description="USD per 1M prompt tokens")
    completion: float = Field(
        ge=0, le=1e6, allow_inf_nan=False, description="USD per 1M completion tokens"
    )

    def usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.prompt + completion_tokens * self.completion) / 1_000_000


def make_limiter(redis_url: str | None, **options) -> Limiter:
    """A ``RedisLimiter`` on ``redis_url`` (shared by replicas), or a ``MemoryLimiter`` if it is
    ``None`` or empty. ``options`` (``window``, ``lease_ttl``) go to the constructor."""
    if redis_url:
        return RedisLimiter(redis_url, **options)
    return MemoryLimiter(**options)


def scope_account(scope: str) -> str:
    """The account a scope belongs to: ``"acme"`` for ``"acme"`` and ``"acme/key_1"``."""
    return scope.partition("/")[0]


# --- shared by both limiters -------------------------------------------------------------------


def _micro(usd: float) -> int:
    """Dollars as whole micro-dollars, rounded up (a reservation is an upper bound; the epsilon
    keeps 0.3 * 1e6 = 300000.00000000006 at 300000)."""
    return max(0, math.ceil(usd * 1_000_000 - 1e-6))


def _what(scope: str) -> str:
    account, _, key = scope.partition("/")
    return f"key {key!r} of account {account!r}" if key else f"account {account!r}"


def _check_request(scopes: Mapping[str, Limits], tokens: int, usd: float) -> None:
    """Refuse, with a 400, a reservation that no amount of waiting would let through."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"tokens={tokens!r}: pass the reserved token count, an int >= 0")
    if (
        isinstance(usd, bool)
        or not isinstance(usd, (int, float))
        or not math.isfinite(usd)
        or usd < 0
    ):
        raise ValueError(f"usd={usd!r}: pass the reserved dollars, a finite number >= 0")
    if not scopes:
        raise ValueError("scopes is empty: pass at least one scope and its limits")
    if len({scope_account(s) for s in scopes}) != 1:
        raise ValueError(
            f"scopes {list(scopes)!r} belong to different accounts: one request, one account"
        )
    for scope, limits in scopes.items():
        for name, limit in (
            ("tokens per minute", limits.tpm),
            ("tokens per day", limits.daily_tokens),
        ):
            if limit is not None and tokens > limit:
                raise InvalidRequestError(
                    f"This request needs up to {tokens} tokens (prompt + max_tokens), more than the "
                    f"limit of {limit} {name} of {_what(scope)}, so it can never be served. Lower "
                    "max_tokens or shorten the prompt.",
                    param="max_tokens",
                    code="request_too_large",
                )
        if limits.daily_usd is not None and _micro(usd) > round(limits.daily_usd * 1_000_000):
            raise InvalidRequestError(
                f"This request can cost up to ${usd:.6f} (prompt + max_tokens at this model's prices), "
                f"more than the daily budget of ${limits.daily_usd:.2f} of {_what(scope)}, so it can "
                "never be served. Lower max_tokens or shorten the prompt.",
                param="max_tokens",
                code="request_too_large",
            )


def _check_actual(actual_tokens: int, actual_usd: float | None) -> None:
    if isinstance(actual_tokens, bool) or not isinstance(actual_tokens, int) or actual_tokens < 0:
        raise ValueError(f"actual_tokens={actual_tokens!r}: pass the tokens used, an int >= 0")
    if actual_usd is not None and (
        not isinstance(actual_usd, (int, float)) or not math.isfinite(actual_usd) or actual_usd < 0
    ):
        raise ValueError(
            f"actual_usd={actual_usd!r}: pass the dollars spent, a finite number >= 0, or None"
        )


def _retry_s(wait: float) -> int:
    """Seconds to announce in Retry-After for a wait of ``wait`` seconds (whole, at least 1)."""
    return max(1, math.ceil(wait - 1e-9))


def _refuse(
    scopes: Mapping[str, Limits],
    tokens: int,
    usd: float,
    window: float,
    refusals: list[tuple[str, str, int, int]],
) -> RateLimited:
    """One error for the refused limits ``(scope, limit, used, retry_after)``: the one that frees
    last (every limit must pass, so the client cannot succeed before that)."""
    scope, limit, used, retry = max(refusals, key=lambda r: r[3])
    limits = scopes[scope]
    per = "minute" if window == 60 else f"{window:g} s"
    if limit == "rpm":
        kind, what = "requests", f"requests per {per} (RPM): limit {limits.rpm}, used {used}"
        what += ", requested 1"
    elif limit == "tpm":
        kind, what = "tokens", f"tokens per {per} (TPM): limit {limits.tpm}, used {used}"
        what += f", requested {tokens}"
    elif limit == "concurrency":
        kind, what = "requests", f"concurrent requests: limit {limits.max_concurrent}"
        what += f", in flight {used}"
    elif limit == "daily_tokens":
        kind, what = "tokens", f"tokens per day (UTC): limit {limits.daily_tokens}, used {used}"
        what += f", requested {tokens}"
    else:
        kind, what = "tokens", f"US dollars per day (UTC): limit ${limits.daily_usd:.2f}"
        what += f", used ${used / 1_000_000:.6f}, requested up to ${usd:.6f}"
    when = f"{retry}s, after 00:00 UTC" if limit.startswith("daily") else f"{retry}s"
    return RateLimited(
        f"Rate limit reached for {_what(scope)} on {what}. Please try again in {when}.",
        limit=limit,
        kind=kind,
        retry_after=retry,
    )


def _new_lease_id() -> str:
    return uuid.uuid4().hex


# --- in process --------------------------------------------------------------------------------


@dataclass
class _Entry:
    """One request in the sliding window; ``tokens`` is settled in place on release."""

    t: float
    lease_id: str
    tokens: int


@dataclass
class _ScopeState:
    window: deque[_Entry] = field(default_factory=deque)  # in acquisition (= time) order
    entries: dict[str, _Entry] = field(default_factory=dict)  # lease_id -> its window entry
    window_tokens: int = 0  # sum of entry tokens
    in_flight: dict[str, float] = field(default_factory=dict)  # lease_id -> expiry, in order
    day: int = -1  # UTC day number that day_tokens and day_micro count
    day_tokens: int = 0
    day_micro: int = 0  # micro-dollars
    day_leases: dict[str, tuple[int, int]] = field(
        default_factory=dict
    )  # unsettled lease -> reserved


class MemoryLimiter:
    """Limits kept in this process's memory, for a single gateway process.

    Exact under any concurrency within one event loop: ``acquire``, ``release`` and ``usage``
    never ``await`` between reading and writing the state, and asyncio switches tasks only at an
    ``await``, so each check-and-record runs as one indivisible step. (Not thread-safe: call it
    from one event loop.)

    ``clock`` returns seconds since the epoch (default ``time.time``) and must not go backwards;
    tests pass a fake one to expire windows and cross midnight without sleeping.
    """

    def __init__(
        self,
        *,
        window: float = 60.0,
        lease_ttl: float = 600.0,
        clock: Callable[[], float] = time.time,
    ):
        if window <= 0 or lease_ttl <= 0:
            raise ConfigError(f"window={window!r}, lease_ttl={lease_ttl!r}: both must be > 0 s")
        self.window = window
        self.lease_ttl = lease_ttl
        self.clock = clock
        self._scopes: dict[str, _ScopeState] = {}

    def _state(self, scope: str, now: float) -> _ScopeState:
        """The scope's state with expired window entries and leases dropped, and today's quota."""
        s = self._scopes.setdefault(scope, _ScopeState())
        cutoff = now - self.window
        while s.window and s.window[0].t <= cutoff:
            e = s.window.popleft()
            del s.entries[e.lease_id]
            s.window_tokens -= e.tokens
        # Every lease lives lease_ttl and the clock is monotone: expiries are in insertion order.
        while s.in_flight:
            lease_id, expiry = next(iter(s.in_flight.items()))
            if expiry > now:
                break
            del s.in_flight[lease_id]
        today = int(now // DAY)
        if s.day != today:
            s.day, s.day_tokens, s.day_micro, s.day_leases = today, 0, 0, {}
        return s

    def _refusals(
        self, scope: str, limits: Limits, s: _ScopeState, tokens: int, micro: int, now: float
    ):
        if limits.rpm is not None and len(s.window) + 1 > limits.rpm:
            # Fits once the oldest len - rpm + 1 entries have left the window.
            oldest_needed = s.window[len(s.window) - limits.rpm]
            yield scope, "rpm", len(s.window), _retry_s(oldest_needed.t + self.window - now)
        if limits.tpm is not None and s.window_tokens + tokens > limits.tpm:
            need, freed = s.window_tokens + tokens - limits.tpm, 0
            for e in s.window:  # terminates: tokens <= tpm, so freeing everything is enough
                freed += e.tokens
                if freed >= need:
                    break
            yield scope, "tpm", s.window_tokens, _retry_s(e.t + self.window - now)
        if limits.max_concurrent is not None and len(s.in_flight) + 1 > limits.max_concurrent:
            yield scope, "concurrency", len(s.in_flight), 1
        to_midnight = _retry_s((s.day + 1) * DAY - now)
        if limits.daily_tokens is not None and s.day_tokens + tokens > limits.daily_tokens:
            yield scope, "daily_tokens", s.day_tokens, to_midnight
        if limits.daily_usd is not None and s.day_micro + micro > round(
            limits.daily_usd * 1_000_000
        ):
            yield scope, "daily_usd", s.day_micro, to_midnight

    async def acquire(
        self, scopes: Mapping[str, Limits], tokens: int, *, usd: float = 0.0
    ) -> Lease:
        _check_request(scopes, tokens, usd)
        micro = _micro(usd)
        # No await from here on: this check-and-record is atomic within the event loop.
        now = self.clock()
        states = {scope: self._state(scope, now) for scope in scopes}
        refusals = [
            r
            for scope, limits in scopes.items()
            for r in self._refusals(scope, limits, states[scope], tokens, micro, now)
        ]
        if refusals:
            raise _refuse(scopes, tokens, usd, self.window, refusals)

        lease_id = _new_lease_id()
        for s in states.values():
            entry = _Entry(now, lease_id, tokens)
            s.window.append(entry)
            s.entries[lease_id] = entry
            s.window_tokens += tokens
            s.in_flight[lease_id] = now + self.lease_ttl
            s.day_tokens += tokens
            s.day_micro += micro
            s.day_leases[lease_id] = (tokens, micro)
        return Lease(tuple(scopes), lease_id, tokens, now, now + self.lease_ttl, micro / 1_000_000)

    async def release(
        self, lease: Lease, actual_tokens: int, actual_usd: float | None = None
    ) -> None:
        _check_actual(actual_tokens, actual_usd)
        now = self.clock()
        for scope in lease.scopes:
            s = self._state(scope, now)
            was_in_flight = s.in_flight.pop(lease.lease_id, None) is not None
            reserved = s.day_leases.pop(lease.lease_id, None)
            if not was_in_flight and reserved is None:
                continue  # released before (or expired and charged to a past day)
            entry = s.entries.get(lease.lease_id)
            if entry is not None:  # still in the window
                s.window_tokens += actual_tokens - entry.tokens
                entry.tokens = actual_tokens
            if reserved is not None:  # charged today
                s.day_tokens += actual_tokens - reserved[0]
                if actual_usd is not None:
                    s.day_micro += _micro(actual_usd) - reserved[1]

    async def usage(self, scope: str) -> dict:
        s = self._state(scope, self.clock())
        return {
            "requests": len(s.window),
            "tokens": s.window_tokens,
            "tokens_today": s.day_tokens,
            "usd_today": s.day_micro / 1_000_000,
            "in_flight": len(s.in_flight),
        }

    async def close(self) -> None:
        self._scopes.clear()


# --- shared through Redis ----------------------------------------------------------------------

# Each scope has four Redis keys. All keys of one account share a hash tag ({account}) so the
# scripts, which touch a key's scope and its account's in one step, also run on Redis Cluster;
# every key a script touches is passed in KEYS (so the daily counters are one hash holding its
# UTC day, reset when the day changes, rather than a key named after a date the client cannot
# know before the script has read Redis's clock):
#   win       sorted set  lease_id -> acquired at (µs)       the sliding window (rpm: its size)
#   amt       hash        lease_id -> tokens, "sum" -> total  token amounts of window entries
#   inflight  sorted set  lease_id -> expires at (µs)        concurrency slots, freed by TTL
#   day       hash        "day" -> UTC day number, "tokens" -> charged today, "usd" -> µ$ today,
#                         lease_id -> reserved tokens, "$" .. lease_id -> reserved µ$
#                         (leases charged today and not yet settled)
# Times are integers in µs from Redis's TIME; Lua numbers are doubles, exact up to 2^53 µs
# (year 2255). Numbers are passed to redis.call as numbers, never concatenated into strings (Lua
# would format them with 14 significant digits).

_LUA_PRELUDE = """
local function clock()
  local t = redis.call('TIME')
  local sec = tonumber(t[1])
  return sec * 1000000 + tonumber(t[2]), sec
end

-- Drop window entries acquired at or before cutoff, with their amounts.
local function purge_window(win, amt, cutoff)
  local old = redis.call('ZRANGEBYSCORE', win, '-inf', cutoff)
  if #old == 0 then return end
  local freed = 0
  for i = 1, #old, 1000 do  -- unpack() is bounded by the Lua stack: go in chunks
    local chunk = {unpack(old, i, math.min(i + 999, #old))}
    local vals = redis.call('HMGET', amt, unpack(chunk))
    for j = 1, #chunk do freed = freed + (tonumber(vals[j]) or 0) end
    redis.call('HDEL', amt, unpack(chunk))
  end
  redis.call('ZREMRANGEBYSCORE', win, '-inf', cutoff)
  if freed ~= 0 then redis.call('HINCRBY', amt, 'sum', -freed) end  -- -0 is no integer to Redis
end

local function roll_day(dayk, today)
  if tonumber(redis.call('HGET', dayk, 'day')) ~= today then
    redis.call('DEL', dayk)
    redis.call('HSET', dayk, 'day', today, 'tokens', 0, 'usd', 0)
    redis.call('EXPIREAT', dayk, (today + 2) * 86400)
  end
end

local function retry_s(wait_us)
  return math.max(1, math.ceil(wait_us / 1000000 - 1e-9))
end
"""

# KEYS: win, amt, inflight, day of each scope in turn.
# ARGV: lease_id, tokens, µ$, window, ttl (µs), then per scope rpm, tpm, max_concurrent,
# daily_tokens, daily µ$ (-1 = unlimited).
# Returns {1, now_us, today} or {0, {{scope index (1-based), limit, used, retry_after}, ...}}.
_LUA_ACQUIRE = (
    _LUA_PRELUDE
    + """
local lease, tokens, micro = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local window, ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
local nscopes = #KEYS / 4

local now, sec = clock()
local today = math.floor(sec / 86400)
local refusals = {}
for s = 1, nscopes do
  local win, amt, inflight, dayk = KEYS[4 * s - 3], KEYS[4 * s - 2], KEYS[4 * s - 1], KEYS[4 * s]
  local a = 5 + 5 * (s - 1)
  local rpm, tpm, maxc = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local daily, dusd = tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  purge_window(win, amt, now - window)
  redis.call('ZREMRANGEBYSCORE', inflight, '-inf', now)
  roll_day(dayk, today)

  local nreq = redis.call('ZCARD', win)
  if rpm >= 0 and nreq + 1 > rpm then
    -- fits once the oldest nreq - rpm + 1 entries have left the window
    local e = redis.call('ZRANGE', win, nreq - rpm, nreq - rpm, 'WITHSCORES')
    table.insert(refusals, {s, 'rpm', nreq, retry_s(tonumber(e[2]) + window - now)})
  end
  local used = tonumber(redis.call('HGET', amt, 'sum')) or 0
  if tpm >= 0 and used + tokens > tpm then
    local need, freed, at, start = used + tokens - tpm, 0, nil, 0
    while at == nil do  -- walk from the oldest entry until enough tokens would have expired
      local page = redis.call('ZRANGE', win, start, start + 99, 'WITHSCORES')
      if #page == 0 then break end
      local ids = {}
      for i = 1, #page, 2 do ids[#ids + 1] = page[i] end
      local vals = redis.call('HMGET', amt, unpack(ids))
      for j = 1, #ids do
        freed = freed + (tonumber(vals[j]) or 0)
        if freed >= need then at = tonumber(page[2 * j]) break end
      end
      start = start + 100
    end
    local wait = window
    if at then wait = at + window - now end
    table.insert(refusals, {s, 'tpm', used, retry_s(wait)})
  end
  local nin = redis.call('ZCARD', inflight)
  if maxc >= 0 and nin + 1 > maxc then
    table.insert(refusals, {s, 'concurrency', nin, 1})
  end
  local to_midnight = 86400 - sec % 86400
  local today_used = tonumber(redis.call('HGET', dayk, 'tokens')) or 0
  if daily >= 0 and today_used + tokens > daily then
    table.insert(refusals, {s, 'daily_tokens', today_used, to_midnight})
  end
  local today_usd = tonumber(redis.call('HGET', dayk, 'usd')) or 0
  if dusd >= 0 and today_usd + micro > dusd then
    table.insert(refusals, {s, 'daily_usd', today_usd, to_midnight})
  end
end
if #refusals > 0 then return {0, refusals} end

for s = 1, nscopes do
  local win, amt, inflight, dayk = KEYS[4 * s - 3], KEYS[4 * s - 2], KEYS[4 * s - 1], KEYS[4 * s]
  redis.call('ZADD', win, now, lease)
  redis.call('HSET', amt, lease, tokens)
  redis.call('HINCRBY', amt, 'sum', tokens)
  redis.call('ZADD', inflight, now + ttl, lease)
  redis.call('HINCRBY', dayk, 'tokens', tokens)
  redis.call('HINCRBY', dayk, 'usd', micro)
  redis.call('HSET', dayk, lease, tokens, '$' .. lease, micro)
  -- idle keys vanish once everything in them has expired
  local keep_ms = math.ceil(window / 1000) + 1000
  redis.call('PEXPIRE', win, keep_ms)
  redis.call('PEXPIRE', amt, keep_ms)
  redis.call('PEXPIRE', inflight, math.ceil(ttl / 1000) + 1000)
end
return {1, now, today}
"""
)

# KEYS: as for acquire. ARGV: lease_id, actual_tokens, actual µ$ (-1: keep the reserved µ$).
# Returns the number of scopes settled (0 if released before).
_LUA_RELEASE = """
local lease, actual, micro = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local settled = 0
for s = 1, #KEYS / 4 do
  local win, amt, inflight, dayk = KEYS[4 * s - 3], KEYS[4 * s - 2], KEYS[4 * s - 1], KEYS[4 * s]
  local was_in_flight = redis.call('ZREM', inflight, lease)
  local reserved = redis.call('HGET', dayk, lease)
  local reserved_usd = redis.call('HGET', dayk, '$' .. lease)
  if reserved then redis.call('HDEL', dayk, lease, '$' .. lease) end
  if was_in_flight == 1 or reserved then
    settled = settled + 1
    local a = redis.call('HGET', amt, lease)
    if a then  -- still in the window
      redis.call('HSET', amt, lease, actual)
      redis.call('HINCRBY', amt, 'sum', actual - tonumber(a))
    end
    if reserved then  -- charged today
      redis.call('HINCRBY', dayk, 'tokens', actual - tonumber(reserved))
      if micro >= 0 and reserved_usd then
        redis.call('HINCRBY', dayk, 'usd', micro - tonumber(reserved_usd))
      end
    end
  end
end
return settled
"""

# KEYS: one scope's four. ARGV: window (µs). Returns {requests, tokens, tokens_today, in_flight,
# µ$ today}.
_LUA_USAGE = (
    _LUA_PRELUDE
    + """
local win, amt, inflight, dayk = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now, sec = clock()
purge_window(win, amt, now - tonumber(ARGV[1]))
redis.call('ZREMRANGEBYSCORE', inflight, '-inf', now)
local today_used, today_usd = 0, 0
if tonumber(redis.call('HGET', dayk, 'day')) == math.floor(sec / 86400) then
  today_used = tonumber(redis.call('HGET', dayk, 'tokens')) or 0
  today_usd = tonumber(redis.call('HGET', dayk, 'usd')) or 0
end
return {redis.call('ZCARD', win), tonumber(redis.call('HGET', amt, 'sum')) or 0, today_used,
        redis.call('ZCARD', inflight), today_usd}
"""
)


class RedisLimiter:
    """Limits shared by every gateway replica that points at the same Redis.

    ``redis`` is a URL (``redis://host:6379/0``; the limiter owns and closes that client) or a
    ``redis.asyncio.Redis`` created with ``decode_responses=True`` (the caller closes it).
    ``window`` and ``lease_ttl`` are in seconds; every replica must use the same values.
    With a URL, at most ``max_connections`` calls run at once; more wait up to ``pool_timeout``
    seconds for a connection. Redis errors (unreachable, timeout) propagate as ``redis``
    exceptions: whether to fail open or closed is the gateway's decision.
    """

    def __init__(
        self,
        redis,
        *,
        window: float = 60.0,
        lease_ttl: float = 600.0,
        prefix: str = "distillguard:limits",
        max_connections: int = 50,
        pool_timeout: float = 20.0,
    ):
        import redis.asyncio as aioredis  # optional dependency: only RedisLimiter needs it

        if window <= 0 or lease_ttl <= 0:
            raise ConfigError(f"window={window!r}, lease_ttl={lease_ttl!r}: both must be > 0 s")
        if isinstance(redis, str):
            # A blocking pool: past max_connections, calls wait for a free connection (a plain
            # pool raises MaxConnectionsError under a burst of concurrent requests).
            pool = aioredis.BlockingConnectionPool.from_url(
                redis, decode_responses=True, max_connections=max_connections, timeout=pool_timeout
            )
            self._redis = aioredis.Redis.from_pool(pool)
            self._owns_client = True
        else:
            self._redis = redis
            self._owns_client = False
        self.window = window
        self.lease_ttl = lease_ttl
        self.prefix = prefix
        self._window_us = round(window * 1_000_000)
        self._ttl_us = round(lease_ttl * 1_000_000)
        # register_script runs EVALSHA and loads the script on NOSCRIPT (e.g. after a restart).
        self._acquire = self._redis.register_script(_LUA_ACQUIRE)
        self._release = self._redis.register_script(_LUA_RELEASE)
        self._usage = self._redis.register_script(_LUA_USAGE)

    def _keys(self, scopes) -> list[str]:
        keys = []
        for scope in scopes:
            base = f"{self.prefix}:{{{scope_account(scope)}}}:{scope}"
            keys += [f"{base}:win", f"{base}:amt", f"{base}:inflight", f"{base}:day"]
        return keys

    async def acquire(
        self, scopes: Mapping[str, Limits], tokens: int, *, usd: float = 0.0
    ) -> Lease:
        _check_request(scopes, tokens, usd)
        micro = _micro(usd)
        lease_id = _new_lease_id()
        unlimited = -1
        args = [lease_id, tokens, micro, self._window_us, self._ttl_us]
        for limits in scopes.values():
            daily_micro = None if limits.daily_usd is None else round(limits.daily_usd * 1_000_000)
            values = (
                limits.rpm,
                limits.tpm,
                limits.max_concurrent,
                limits.daily_tokens,
                daily_micro,
            )
            args += [unlimited if v is None else v for v in values]
        reply = await self._acquire(keys=self._keys(scopes), args=args)
        names = list(scopes)
        if reply[0] == 0:
            refusals = [
                (names[int(i) - 1], str(limit), int(used), int(retry))
                for i, limit, used, retry in reply[1]
            ]
            raise _refuse(scopes, tokens, usd, self.window, refusals)
        now = int(reply[1]) / 1_000_000
        return Lease(tuple(names), lease_id, tokens, now, now + self.lease_ttl, micro / 1_000_000)

    async def release(
        self, lease: Lease, actual_tokens: int, actual_usd: float | None = None
    ) -> None:
        _check_actual(actual_tokens, actual_usd)
        micro = -1 if actual_usd is None else _micro(actual_usd)
        await self._release(
            keys=self._keys(lease.scopes), args=[lease.lease_id, actual_tokens, micro]
        )

    async def usage(self, scope: str) -> dict:
        requests, tokens, today, in_flight, micro = await self._usage(
            keys=self._keys([scope]), args=[self._window_us]
        )
        return {
            "requests": int(requests),
            "tokens": int(tokens),
            "tokens_today": int(today),
            "usd_today": int(micro) / 1_000_000,
            "in_flight": int(in_flight),
        }

    async def close(self) -> None:
        if self._owns_client:
            await self._redis.aclose()
