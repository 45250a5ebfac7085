"""``MemoryLimiter``: the limits counted in this process's memory, for a single gateway process."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from distillguard.errors import ConfigError
from distillguard.guard.limits.base import (
    DAY,
    Lease,
    Limits,
    _check_actual,
    _check_request,
    _micro,
    _new_lease_id,
    _refuse,
    _retry_s,
)


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
