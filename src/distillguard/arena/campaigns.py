"""Built-in extraction campaigns, registered like any plugin (:func:`register_campaign`).

Each generator gets a :class:`CampaignContext` (its accounts, window, rpm limit, random stream
and the attack pool) and yields :class:`Call` s. Seed text comes from the attack pool and from
the templates below, never from the benign pools.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from functools import lru_cache

from distillguard.arena.traffic import Call, CampaignContext, estimate_tokens, register_campaign

MAX_PROMPT_CHARS = 4000


@lru_cache(maxsize=4)
def _seed_prompts(attack: tuple) -> tuple[tuple[str, int, str], ...]:
    """(first user turn, answer tokens, topic) of every attack-pool conversation."""
    out = []
    for t in attack:
        if len(t.turns[0]) <= MAX_PROMPT_CHARS:
            answer = t.answer(0)
            out.append((t.turns[0], estimate_tokens(answer) if answer else 300, t.topic))
    return tuple(out)


def _account_rng(ctx: CampaignContext, j: int) -> random.Random:
    return random.Random(f"{ctx.campaign_id}|{j}|{ctx.rng.random()}")


def _datacenter_ip(rng: random.Random, prefix: str | None = None) -> str:
    """An address in a hosting provider's range (or in ``prefix``, a /24 like "45.83.17")."""
    if prefix is None:
        prefix = f"{rng.choice((5, 23, 34, 45, 51, 64, 104, 138, 159, 167, 185, 195))}.{rng.randrange(256)}." \
                 f"{rng.randrange(256)}"
    return f"{prefix}.{rng.randrange(2, 254)}"


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@register_campaign("bulk", default_accounts=1, default_requests=2000,
                   description="one account, many single-turn attack-pool prompts, fast and 24/7")
def bulk(ctx: CampaignContext) -> Iterator[Call]:
    """A script walks a prompt list: one fixed parameter set, ~40 requests a minute, no pauses."""
    prompts = _seed_prompts(ctx.attack)
    for j, account in enumerate(ctx.accounts):
        rng = _account_rng(ctx, j)
        ip = _datacenter_ip(rng)
        order = rng.sample(range(len(prompts)), len(prompts))
        temperature, max_tokens = rng.choice((0.7, 1.0)), rng.choice((1024, 2048))
        t = ctx.start + rng.uniform(0, (ctx.end - ctx.start) / 2)
        for r in range(ctx.requests_per_account):
            text, out, _ = prompts[order[r % len(order)]]
            if r >= len(order):  # the list is used up: send it again, reworded a little
                text = rng.choice(("Answer in detail: ", "Please respond: ", "Q: ")) + text
            yield Call(t, account, ip, ctx.request(_user(text), temperature=temperature, max_tokens=max_tokens), out)
            t += rng.expovariate(1 / 1.5)
