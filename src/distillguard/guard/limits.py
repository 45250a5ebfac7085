"""Per-API-key rate limits and quotas: reserve before serving, settle after.

Four limits per key (``None`` = unlimited):

- ``rpm``: requests in a rolling window (60 s by default),
- ``tpm``: tokens (prompt + completion) in the same rolling window,
- ``max_concurrent``: requests in flight,
- ``daily_tokens``: tokens per UTC day.

The gateway calls ``acquire`` before it serves a request, with an upper bound on the tokens the
request can use (prompt tokens + max completion tokens). ``acquire`` checks all four limits and,
only if all pass, records the request, reserves the tokens in the window and in today's quota and
takes a concurrency slot, in one atomic step. When the answer is done, ``release`` frees the slot
and settles the reservation to the tokens actually used. A key therefore can never spend more
than its budget, however many requests race (spend recorded after the fact can be overrun by every
request in flight).

Windows are exact sliding windows: a request acquired at ``t`` counts until ``t + window``, so no
60 s interval ever holds more than ``rpm`` requests (fixed one-minute buckets let through 2x
``rpm`` around a bucket boundary). ``Retry-After`` is the time until enough of the window has
expired for the refused request to fit; for the daily quota, until the next 00:00 UTC; for
concurrency, 1 s (a slot frees when any request finishes, which cannot be predicted).

A request whose reservation exceeds ``tpm`` or ``daily_tokens`` on its own would never fit, so
it is refused with a 400 ``InvalidRequestError`` (code ``request_too_large``, param
``max_tokens``) rather than a 429: clients (the OpenAI SDK among them) retry 429s automatically,
and retrying this request can only fail again; the fix is a smaller ``max_tokens``.

Two implementations of one ``Limiter`` protocol:

- ``MemoryLimiter``: one process, one event loop.
- ``RedisLimiter``: shared by any number of gateway replicas through one Redis. Each operation is
  one Lua script, so check-and-record is atomic across replicas, and scripts read the time from
  Redis (``TIME``) so replicas with skewed clocks agree on the windows and on the UTC day.
"""

from __future__ import annotations

import math
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

from distillguard.errors import ConfigError, InvalidRequestError, RateLimited

__all__ = [
    "Lease",
    "Limiter",
    "Limits",
    "MemoryLimiter",
    "RateLimited",
    "RedisLimiter",
    "make_limiter",
]

DAY = 86_400  # seconds in a UTC day (POSIX time has no leap seconds)


@dataclass(frozen=True)
class Limits:
    """The limits of one API key. ``None`` means unlimited."""

    rpm: int | None = None  # requests per rolling window (60 s)
    tpm: int | None = None  # tokens (prompt + completion) per rolling window (60 s)
    max_concurrent: int | None = None  # requests in flight
    daily_tokens: int | None = None  # tokens per UTC day

    def __post_init__(self):
        for name in ("rpm", "tpm", "max_concurrent", "daily_tokens"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"Limits.{name}={value!r} is invalid: use a positive integer, or None for "
                    "unlimited (to block a key, revoke it instead of setting a limit of 0)"
                )


@dataclass(frozen=True)
class Lease:
    """What ``acquire`` hands out and ``release`` takes back.

    Times are in seconds since the epoch, on the limiter's clock (Redis's clock for
    ``RedisLimiter``). After ``expires_at`` the concurrency slot frees itself even if the lease
    is never released (a crashed replica, a lost task); the tokens stay charged as reserved.
    """

    key_id: str
    lease_id: str
    reserved_tokens: int
    acquired_at: float
    expires_at: float


class Limiter(Protocol):
    async def acquire(self, key_id: str, limits: Limits, tokens: int) -> Lease:
        """Check every limit of ``key_id`` and, only if all pass, record one request, reserve
        ``tokens`` (an upper bound) in the window and today's quota, and take a concurrency slot.

        Raises ``RateLimited`` (429) when a limit is exhausted, ``InvalidRequestError`` (400) when
        ``tokens`` exceeds ``tpm`` or ``daily_tokens`` on its own; nothing is recorded then.
        """
        ...

    async def release(self, lease: Lease, actual_tokens: int) -> None:
        """Free the lease's concurrency slot and settle its reservation to ``actual_tokens``.
        Releasing a lease twice is a no-op."""
        ...

    async def usage(self, key_id: str) -> dict:
        """``{"requests", "tokens"}`` in the current window, ``"tokens_today"`` (UTC) and
        ``"in_flight"``."""
        ...

    async def close(self) -> None: ...


def make_limiter(redis_url: str | None, **options) -> Limiter:
    """A ``RedisLimiter`` on ``redis_url`` (shared by replicas), or a ``MemoryLimiter`` if it is
    ``None`` or empty. ``options`` (``window``, ``lease_ttl``) go to the constructor."""
    if redis_url:
        return RedisLimiter(redis_url, **options)
    return MemoryLimiter(**options)


# --- shared by both limiters -------------------------------------------------------------------


def _check_request(limits: Limits, tokens: int) -> None:
    """Refuse, with a 400, a reservation that no amount of waiting would let through."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"tokens={tokens!r}: pass the reserved token count, an int >= 0")
    for name, limit in (("tokens per minute", limits.tpm), ("tokens per day", limits.daily_tokens)):
        if limit is not None and tokens > limit:
            raise InvalidRequestError(
                f"This request needs up to {tokens} tokens (prompt + max_tokens), more than this "
                f"key's limit of {limit} {name}, so it can never be served. Lower max_tokens or "
                "shorten the prompt.",
                param="max_tokens",
                code="request_too_large",
            )


def _check_tokens(actual_tokens: int) -> None:
    if isinstance(actual_tokens, bool) or not isinstance(actual_tokens, int) or actual_tokens < 0:
        raise ValueError(f"actual_tokens={actual_tokens!r}: pass the tokens used, an int >= 0")


def _retry_s(wait: float) -> int:
    """Seconds to announce in Retry-After for a wait of ``wait`` seconds (whole, at least 1)."""
    return max(1, math.ceil(wait - 1e-9))


def _refuse(
    key_id: str, limits: Limits, tokens: int, window: float, refusals: list[tuple[str, int, int]]
) -> RateLimited:
    """One error for the refused limits ``(limit, used, retry_after)``: the one that frees last
    (every limit must pass, so the client cannot succeed before that)."""
    limit, used, retry = max(refusals, key=lambda r: r[2])
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
    else:
        kind, what = "tokens", f"tokens per day (UTC): limit {limits.daily_tokens}, used {used}"
        what += f", requested {tokens}"
    when = f"{retry}s, after 00:00 UTC" if limit == "daily_tokens" else f"{retry}s"
    return RateLimited(
        f"Rate limit reached for key {key_id!r} on {what}. Please try again in {when}.",
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
class _KeyState:
    window: deque[_Entry] = field(default_factory=deque)  # in acquisition (= time) order
    entries: dict[str, _Entry] = field(default_factory=dict)  # lease_id -> its window entry
    window_tokens: int = 0  # sum of entry tokens
    in_flight: dict[str, float] = field(default_factory=dict)  # lease_id -> expiry, in order
    day: int = -1  # UTC day number that day_tokens counts
    day_tokens: int = 0
    day_leases: dict[str, int] = field(default_factory=dict)  # unsettled lease -> reserved


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
        self._keys: dict[str, _KeyState] = {}

    def _state(self, key_id: str, now: float) -> _KeyState:
        """The key's state with expired window entries and leases dropped, and today's quota."""
        s = self._keys.setdefault(key_id, _KeyState())
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
            s.day, s.day_tokens, s.day_leases = today, 0, {}
        return s

    async def acquire(self, key_id: str, limits: Limits, tokens: int) -> Lease:
        _check_request(limits, tokens)
        # No await from here on: this check-and-record is atomic within the event loop.
        now = self.clock()
        s = self._state(key_id, now)
        refusals = []
        if limits.rpm is not None and len(s.window) + 1 > limits.rpm:
            # Fits once the oldest len - rpm + 1 entries have left the window.
            oldest_needed = s.window[len(s.window) - limits.rpm]
            refusals.append(("rpm", len(s.window), _retry_s(oldest_needed.t + self.window - now)))
        if limits.tpm is not None and s.window_tokens + tokens > limits.tpm:
            need, freed = s.window_tokens + tokens - limits.tpm, 0
            for e in s.window:  # terminates: tokens <= tpm, so freeing everything is enough
                freed += e.tokens
                if freed >= need:
                    break
            refusals.append(("tpm", s.window_tokens, _retry_s(e.t + self.window - now)))
        if limits.max_concurrent is not None and len(s.in_flight) + 1 > limits.max_concurrent:
            refusals.append(("concurrency", len(s.in_flight), 1))
        if limits.daily_tokens is not None and s.day_tokens + tokens > limits.daily_tokens:
            refusals.append(("daily_tokens", s.day_tokens, _retry_s((s.day + 1) * DAY - now)))
        if refusals:
            raise _refuse(key_id, limits, tokens, self.window, refusals)

        lease_id = _new_lease_id()
        entry = _Entry(now, lease_id, tokens)
        s.window.append(entry)
        s.entries[lease_id] = entry
        s.window_tokens += tokens
        s.in_flight[lease_id] = now + self.lease_ttl
        s.day_tokens += tokens
        s.day_leases[lease_id] = tokens
        return Lease(key_id, lease_id, tokens, now, now + self.lease_ttl)

    async def release(self, lease: Lease, actual_tokens: int) -> None:
        _check_tokens(actual_tokens)
        s = self._state(lease.key_id, self.clock())
        was_in_flight = s.in_flight.pop(lease.lease_id, None) is not None
        reserved = s.day_leases.pop(lease.lease_id, None)
        if not was_in_flight and reserved is None:
            return  # released before (or expired and charged to a past day)
        entry = s.entries.get(lease.lease_id)
        if entry is not None:  # still in the window
            s.window_tokens += actual_tokens - entry.tokens
            entry.tokens = actual_tokens
        if reserved is not None:  # charged today
            s.day_tokens += actual_tokens - reserved

    async def usage(self, key_id: str) -> dict:
        s = self._state(key_id, self.clock())
        return {
            "requests": len(s.window),
            "tokens": s.window_tokens,
            "tokens_today": s.day_tokens,
            "in_flight": len(s.in_flight),
        }

    async def close(self) -> None:
        self._keys.clear()


# --- shared through Redis ----------------------------------------------------------------------

# Keys of one API key share a hash tag ({key_id}) so the scripts also run on Redis Cluster, and
# every key a script touches is passed in KEYS (so the daily counter is one hash holding its UTC
# day, reset when the day changes, rather than a key named after a date the client cannot know
# before the script has read Redis's clock):
#   win       sorted set  lease_id -> acquired at (µs)       the sliding window (rpm: its size)
#   amt       hash        lease_id -> tokens, "sum" -> total  token amounts of window entries
#   inflight  sorted set  lease_id -> expires at (µs)        concurrency slots, freed by TTL
#   day       hash        "day" -> UTC day number, "tokens" -> charged today,
#                         lease_id -> reserved (leases charged today and not yet settled)
# Times are integers in µs from Redis's TIME; Lua numbers are doubles, exact up to 2^53 µs
# (year 2255). Numbers are passed to redis.call as numbers, never concatenated into strings (Lua
# would format them with 14 significant digits).

_LUA_PRELUDE = """
local win, amt, inflight, dayk = KEYS[1], KEYS[2], KEYS[3], KEYS[4]

local function clock()
  local t = redis.call('TIME')
  local sec = tonumber(t[1])
  return sec * 1000000 + tonumber(t[2]), sec
end

-- Drop window entries acquired at or before cutoff, with their amounts.
local function purge_window(cutoff)
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

local function retry_s(wait_us)
  return math.max(1, math.ceil(wait_us / 1000000 - 1e-9))
end
"""

# ARGV: lease_id, tokens, rpm, tpm, max_concurrent, daily_tokens (-1 = unlimited), window, ttl (µs)
# Returns {1, now_us, today} or {0, {{limit, used, retry_after}, ...}}.
_LUA_ACQUIRE = (
    _LUA_PRELUDE
    + """
local lease, tokens = ARGV[1], tonumber(ARGV[2])
local rpm, tpm = tonumber(ARGV[3]), tonumber(ARGV[4])
local maxc, daily = tonumber(ARGV[5]), tonumber(ARGV[6])
local window, ttl = tonumber(ARGV[7]), tonumber(ARGV[8])

local now, sec = clock()
purge_window(now - window)
redis.call('ZREMRANGEBYSCORE', inflight, '-inf', now)
local today = math.floor(sec / 86400)
if tonumber(redis.call('HGET', dayk, 'day')) ~= today then
  redis.call('DEL', dayk)
  redis.call('HSET', dayk, 'day', today, 'tokens', 0)
  redis.call('EXPIREAT', dayk, (today + 2) * 86400)
end

local refusals = {}
local nreq = redis.call('ZCARD', win)
if rpm >= 0 and nreq + 1 > rpm then
  -- fits once the oldest nreq - rpm + 1 entries have left the window
  local e = redis.call('ZRANGE', win, nreq - rpm, nreq - rpm, 'WITHSCORES')
  table.insert(refusals, {'rpm', nreq, retry_s(tonumber(e[2]) + window - now)})
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
  table.insert(refusals, {'tpm', used, retry_s(wait)})
end
local nin = redis.call('ZCARD', inflight)
if maxc >= 0 and nin + 1 > maxc then
  table.insert(refusals, {'concurrency', nin, 1})
end
local today_used = tonumber(redis.call('HGET', dayk, 'tokens')) or 0
if daily >= 0 and today_used + tokens > daily then
  table.insert(refusals, {'daily_tokens', today_used, 86400 - sec % 86400})
end
if #refusals > 0 then return {0, refusals} end

redis.call('ZADD', win, now, lease)
redis.call('HSET', amt, lease, tokens)
redis.call('HINCRBY', amt, 'sum', tokens)
redis.call('ZADD', inflight, now + ttl, lease)
redis.call('HINCRBY', dayk, 'tokens', tokens)
redis.call('HSET', dayk, lease, tokens)
-- idle keys vanish once everything in them has expired
local keep_ms = math.ceil(window / 1000) + 1000
redis.call('PEXPIRE', win, keep_ms)
redis.call('PEXPIRE', amt, keep_ms)
redis.call('PEXPIRE', inflight, math.ceil(ttl / 1000) + 1000)
return {1, now, today}
"""
)

# ARGV: lease_id, actual_tokens. Returns 1 if settled, 0 if released before.
_LUA_RELEASE = (
    _LUA_PRELUDE
    + """
local lease, actual = ARGV[1], tonumber(ARGV[2])
local was_in_flight = redis.call('ZREM', inflight, lease)
local reserved = redis.call('HGET', dayk, lease)
if reserved then redis.call('HDEL', dayk, lease) end
if was_in_flight == 0 and not reserved then return 0 end
local a = redis.call('HGET', amt, lease)
if a then  -- still in the window
  redis.call('HSET', amt, lease, actual)
  redis.call('HINCRBY', amt, 'sum', actual - tonumber(a))
end
if reserved then  -- charged today
  redis.call('HINCRBY', dayk, 'tokens', actual - tonumber(reserved))
end
return 1
"""
)

# ARGV: window (µs). Returns {requests, tokens, tokens_today, in_flight}.
_LUA_USAGE = (
    _LUA_PRELUDE
    + """
local now, sec = clock()
purge_window(now - tonumber(ARGV[1]))
redis.call('ZREMRANGEBYSCORE', inflight, '-inf', now)
local today_used = 0
if tonumber(redis.call('HGET', dayk, 'day')) == math.floor(sec / 86400) then
  today_used = tonumber(redis.call('HGET', dayk, 'tokens')) or 0
end
return {redis.call('ZCARD', win), tonumber(redis.call('HGET', amt, 'sum')) or 0, today_used,
        redis.call('ZCARD', inflight)}
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

    def _keys(self, key_id: str) -> list[str]:
        base = f"{self.prefix}:{{{key_id}}}"
        return [f"{base}:win", f"{base}:amt", f"{base}:inflight", f"{base}:day"]

    async def acquire(self, key_id: str, limits: Limits, tokens: int) -> Lease:
        _check_request(limits, tokens)
        lease_id = _new_lease_id()
        values = (limits.rpm, limits.tpm, limits.max_concurrent, limits.daily_tokens)
        unlimited = -1
        args = [
            lease_id,
            tokens,
            *(unlimited if v is None else v for v in values),
            self._window_us,
            self._ttl_us,
        ]
        reply = await self._acquire(keys=self._keys(key_id), args=args)
        if reply[0] == 0:
            refusals = [(str(limit), int(used), int(retry)) for limit, used, retry in reply[1]]
            raise _refuse(key_id, limits, tokens, self.window, refusals)
        now = int(reply[1]) / 1_000_000
        return Lease(key_id, lease_id, tokens, now, now + self.lease_ttl)

    async def release(self, lease: Lease, actual_tokens: int) -> None:
        _check_tokens(actual_tokens)
        await self._release(keys=self._keys(lease.key_id), args=[lease.lease_id, actual_tokens])

    async def usage(self, key_id: str) -> dict:
        requests, tokens, today, in_flight = await self._usage(
            keys=self._keys(key_id), args=[self._window_us]
        )
        return {
            "requests": int(requests),
            "tokens": int(tokens),
            "tokens_today": int(today),
            "in_flight": int(in_flight),
        }

    async def close(self) -> None:
        if self._owns_client:
            await self._redis.aclose()
