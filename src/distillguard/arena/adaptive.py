"""An attacker who adapts: one actor spread over many accounts, each under every single-account
signal the detectors use (issue 23, "attackers who adapt").

What each account of the ``adaptive`` campaign does, against the signal it evades:

==================  ========================================================================
signal              how the account stays under it
==================  ========================================================================
volume              REQUESTS per account over the window, spread evenly over its days (the
                    arena's heavy users send ~60-150 a day; REQUESTS 20-180 over 2 days stays
                    at or below them)
timing              sessions at local daytime hours (``benign.DIURNAL``, the account's own time
                    zone), reading and typing time between turns like ``benign._user_calls``
multi-turn          whole attack-pool conversations, every user turn with the earlier turns and
                    their answers (``benign.conversation_messages``), as a chat client sends
request shape       each account its own client: stream or not, temperature and max_tokens drawn
                    from the benign users' choices; no logprobs, no ``n``, no system prompt
templates, CoT      real prompts only (ShareGPT attack pool), no template, no reasoning suffix
linking             no shared system prompt, no shared address: each account on its own
                    residential-looking /24 (distinct across the campaign); the pool is split
                    between the accounts so no two send the same conversation, while it lasts
topics              each account works through a topic-sorted slice of the pool, so it stays on
                    a few topics the way a person does
==================  ========================================================================

What is left that ties the accounts together is only what the actor wants: together they cover
the pool. When ACCOUNTS x REQUESTS exceeds the pool's user turns (~11.5k), conversations are
handed out again to other accounts (the actor has run out of real prompts): those repeats are
the near-duplicates linking can see, and the evaluation reports how many there were.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

from distillguard.arena.benign import DIURNAL, TIMEZONES, conversation_messages
from distillguard.arena.traffic import (
    Call,
    CampaignContext,
    estimate_tokens,
    random_ip,
    register_campaign,
)


def distinct_subnet_ips(rng: random.Random, n: int) -> list[str]:
    """``n`` public-looking addresses in ``n`` distinct /24s (residential proxies: one exit each)."""
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        ip = random_ip(rng)
        prefix = ip.rsplit(".", 1)[0]
        if prefix not in seen:
            seen.add(prefix)
            out.append(ip)
    return out


def _day_sessions(rng: random.Random, day0: float, tz: float, sessions: int) -> list[float]:
    """Session start times of one day at the account's local daytime hours."""
    return sorted(
        day0 + (rng.choices(range(24), DIURNAL)[0] - tz) % 24 * 3600.0 + rng.uniform(0, 3600)
        for _ in range(sessions)
    )


@register_campaign(
    "adaptive",
    default_accounts=50,
    default_requests=60,
    description="an adaptive actor: many accounts, each a heavy human's volume at most, human "
    "timing, multi-turn real conversations, own /24 and client, disjoint prompts",
)
def adaptive(ctx: CampaignContext) -> Iterator[Call]:
    """ACCOUNTS accounts each sending about REQUESTS requests over the window, built to look like
    a benign user on every single-account signal (module docstring)."""
    rng = ctx.rng
    threads = sorted(ctx.attack, key=lambda t: (t.topic, t.focus or "", t.id))  # topic slices
    n = len(ctx.accounts)
    ips = distinct_subnet_ips(rng, n)
    days = max(1, math.ceil((ctx.end - ctx.start) / 86400))
    # account j starts at its own contiguous slice (threads[j::n] would mix topics); past its
    # end it goes on into the next account's slice: the repeats across accounts of a campaign
    # that has more requests than the pool has conversations
    per = max(1, len(threads) // n)
    for j, account in enumerate(ctx.accounts):
        arng = random.Random(f"{ctx.campaign_id}|{j}|{rng.random()}")
        tz = arng.choices([t for t, _ in TIMEZONES], [w for _, w in TIMEZONES])[0]
        stream = arng.random() < 0.4
        temperature = arng.choice((None, None, None, 0.7, 1.0, 0.2))
        max_tokens = arng.choice((None, None, 512, 1024, 2048))
        read_speed = arng.uniform(4.0, 20.0)
        params = {"stream": True if stream else None, "temperature": temperature}
        params["max_tokens"] = max_tokens
        # the requests of each day: REQUESTS spread evenly over the days, like a regular user
        quota = [
            ctx.requests_per_account * (d + 1) // days - ctx.requests_per_account * d // days
            for d in range(days)
        ]
        cursor = (j * per) % len(threads)
        for d in range(days):
            todo = quota[d]
            if todo <= 0:
                continue
            # a heavy user's sessions: about 12 requests each, 2-8 a day
            sessions = max(1, min(8, math.ceil(todo / 12)))
            busy = ctx.start
            for s_i, t in enumerate(_day_sessions(arng, ctx.start + d * 86400.0, tz, sessions)):
                t = max(t, busy + arng.uniform(600, 3600))
                budget = todo * (s_i + 1) // sessions - todo * s_i // sessions
                while budget > 0:
                    thread = threads[cursor]
                    cursor = (cursor + 1) % len(threads)
                    for k in range(min(len(thread.user_turns), budget)):
                        answer = thread.answer(k)
                        out = (
                            estimate_tokens(answer)
                            if answer
                            else int(arng.lognormvariate(math.log(250), 0.8))
                        )
                        req = ctx.request(conversation_messages(None, thread, k), **params)
                        yield Call(t, account, ips[j], req, out)
                        budget -= 1
                        shown = min(out, max_tokens or out)
                        t += 0.5 + shown / 40.0  # generation
                        t += min(shown / read_speed * arng.lognormvariate(0, 0.5), 900.0)
                        t += arng.lognormvariate(math.log(15), 1.0)  # thinking
                        if k + 1 < len(thread.user_turns):
                            nxt = len(thread.turns[2 * k + 2])
                            t += nxt / 5.0 if nxt < 400 else arng.uniform(3, 20)  # typing
                    t += arng.lognormvariate(math.log(90), 0.8)  # before the next conversation
                busy = t
