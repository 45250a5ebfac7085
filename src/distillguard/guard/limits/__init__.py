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

The code: ``base`` (limits, lease, protocol, prices, the checks both limiters share),
``memory`` (``MemoryLimiter``) and ``redis`` (``RedisLimiter`` and its Lua scripts); every name
is importable from here.
"""

from __future__ import annotations

from distillguard.errors import RateLimited
from distillguard.guard.limits.base import (
    DAY,
    MAX_DAILY_TOKENS,
    MAX_DAILY_USD,
    MAX_RATE,
    Lease,
    Limiter,
    Limits,
    Price,
    scope_account,
)
from distillguard.guard.limits.memory import MemoryLimiter
from distillguard.guard.limits.redis import RedisLimiter

__all__ = [
    "DAY",
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


def make_limiter(redis_url: str | None, **options) -> Limiter:
    """A ``RedisLimiter`` on ``redis_url`` (shared by replicas), or a ``MemoryLimiter`` if it is
    ``None`` or empty. ``options`` (``window``, ``lease_ttl``) go to the constructor."""
    if redis_url:
        return RedisLimiter(redis_url, **options)
    return MemoryLimiter(**options)
