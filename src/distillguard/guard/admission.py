"""Limits on the request path: reserve a request's most tokens and dollars up front, settle the
reservation to what it used (the counters themselves: ``guard/limits.py``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from distillguard.errors import APIError
from distillguard.guard.auth import PermissionDenied
from distillguard.guard.keys import KeyRecord
from distillguard.guard.limits import Lease, Limiter, Price, RateLimited
from distillguard.guard.metrics import Metrics
from distillguard.guard.policy import Decision

log = logging.getLogger(__name__)


class LimiterUnavailable(APIError):
    status_code = 503
    type = "server_error"


@dataclass(frozen=True)
class Admission:
    """A request's reservation (the limiter's lease over its key and account) and the price it
    was reserved at, so that settling prices the tokens actually used the same way."""

    lease: Lease
    price: Price | None = None


def key_scope(key: KeyRecord) -> str:
    """The limiter's scope of one key: within its account's (see guard/limits.py)."""
    return f"{key.account}/{key.id}"


def _redis_errors() -> type[BaseException]:
    try:
        from redis.exceptions import RedisError
    except ImportError:  # pragma: no cover - redis is a dependency, but only needed with --redis
        return OSError
    return RedisError


class Admitter:
    """Admits requests against their key's and account's limits, priced by ``prices`` (model id
    -> USD per 1M tokens; ``'*'``: every other model)."""

    def __init__(self, limiter: Limiter, prices: dict[str, Price], metrics: Metrics):
        self.limiter = limiter
        self.prices = prices
        self.metrics = metrics

    async def admit(
        self,
        key: KeyRecord,
        budget: int,
        decision: Decision | None = None,
        *,
        model: str | None = None,
        prompt_tokens: int | None = None,
    ) -> Admission:
        """Reserve ``budget`` tokens (prompt + max completion), and their price, against the
        key's limits and its account's at once: an account's keys share its limits, so ten keys
        get the account's budget, not ten times it. A throttling verdict tightens both."""
        key_limits, account_limits = key.limits, key.account_limits
        if decision is not None:
            key_limits, account_limits = (
                decision.limits(key_limits),
                decision.limits(account_limits),
            )
        price = self.price_of(model)
        if price is None and (
            key_limits.daily_usd is not None or account_limits.daily_usd is not None
        ):
            # Fail closed: a budget in dollars cannot hold over a model without a price.
            raise PermissionDenied(
                f"model {model!r} has no price on this server and account {key.account!r} has a "
                "daily USD budget, so it cannot be served; the operator must add the model "
                "(or '*') to DISTILLGUARD_PRICES",
                param="model",
                code="model_not_priced",
            )
        usd = 0.0
        if price is not None:
            prompt = budget if prompt_tokens is None else min(prompt_tokens, budget)
            # Without the split, every token is priced at the dearer rate (an upper bound).
            usd = (
                price.usd(prompt, budget - prompt)
                if prompt_tokens is not None
                else budget * max(price.prompt, price.completion) / 1_000_000
            )
        scopes = {key_scope(key): key_limits, key.account: account_limits}
        try:
            return Admission(await self.limiter.acquire(scopes, budget, usd=usd), price)
        except RateLimited as exc:
            self.metrics.rate_limited.labels(limit=exc.limit).inc()
            raise
        except (OSError, _redis_errors()) as exc:
            # Fail closed: without the shared counters no limit can be enforced.
            raise LimiterUnavailable(
                f"the rate limiter is unavailable ({exc.__class__.__name__}); retry later",
                code="limiter_unavailable",
            ) from None

    def price_of(self, model: str | None) -> Price | None:
        prices = self.prices
        return prices.get(model) if model in prices else prices.get("*")

    async def settle(
        self, lease: Admission | None, actual_tokens: int, prompt_tokens: int | None = None
    ) -> None:
        """Settle the reservation to the tokens used (``prompt_tokens`` of them the prompt's,
        which prices them; without it the reserved dollars stay charged: never less than spent)."""
        if lease is None:
            return
        usd = None
        if lease.price is not None and prompt_tokens is not None:
            prompt = min(prompt_tokens, actual_tokens)
            usd = lease.price.usd(prompt, actual_tokens - prompt)
        elif lease.price is None or actual_tokens == 0:
            usd = 0.0
        try:
            await self.limiter.release(lease.lease, actual_tokens, usd)
        except (OSError, _redis_errors()):
            # The lease expires by itself (its TTL); the answer already went out.
            log.warning("could not settle lease %s; it will expire", lease.lease.lease_id)


__all__ = ["Admission", "Admitter", "LimiterUnavailable", "key_scope"]
