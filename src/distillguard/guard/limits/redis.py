"""``RedisLimiter``: the limits shared by any number of gateway replicas through one Redis, each
operation one Lua script over every scope of a request."""

from __future__ import annotations

from collections.abc import Mapping

from distillguard.errors import ConfigError
from distillguard.guard.limits.base import (
    Lease,
    Limits,
    _check_actual,
    _check_request,
    _micro,
    _new_lease_id,
    _refuse,
    scope_account,
)

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
