"""What both limiters share: the limits of a scope, the lease, the ``Limiter`` protocol, prices,
and the checks and refusals that must read the same whichever store counts."""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from distillguard.errors import ConfigError, InvalidRequestError, RateLimited

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


# A frozen dataclass, not a pydantic config: a value read per request from a key's row, checked
# here, with no CLI option to share help with; dataclasses.replace tightens it (policy.Decision).
# Not for speed: a pydantic twin costs 1.1 us a construction against 1.5 (timeit, CPU time).
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
