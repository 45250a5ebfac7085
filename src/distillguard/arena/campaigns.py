"""Built-in extraction campaigns, registered like any plugin: each generator is decorated with
:func:`register_campaign` and named by an entry point of ``distillguard.campaigns`` in
``pyproject.toml``.

Each generator gets a :class:`CampaignContext` (its accounts, window, rpm limit, random stream
and the attack pool) and yields :class:`Call` s. Seed text comes from the attack pool and from
the templates below, never from the benign pools.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from functools import lru_cache

from distillguard.arena.base import (
    Call,
    CampaignContext,
    estimate_tokens,
    random_ip,
    register_campaign,
)
from distillguard.arena.benign import DIURNAL, conversation_messages
from distillguard.arena.campaign_material import (
    AUDIENCES,
    AUTHORS,
    COT_SUFFIXES,
    COT_SYSTEMS,
    EVOL_BREADTH,
    EVOL_DEPTH,
    EVOL_PROMPT,
    GENRES,
    ITEMS,
    NAMES,
    SELF_INSTRUCT,
    SUBJECTS,
    TEMPLATES,
    _by_topic_round_robin,
    _evol,
    _logic_puzzle,
    _math_problem,
    _self_instruct,
    _short_seeds,
    _template_prompt,
    _work_shifts,
)

# the seed material moved to campaign_material.py stays importable from here
__all__ = [
    "AUDIENCES",
    "AUTHORS",
    "COT_SUFFIXES",
    "COT_SYSTEMS",
    "EVOL_BREADTH",
    "EVOL_DEPTH",
    "EVOL_PROMPT",
    "GENRES",
    "ITEMS",
    "MAX_PROMPT_CHARS",
    "NAMES",
    "SELF_INSTRUCT",
    "SUBJECTS",
    "TEMPLATES",
    "bulk",
    "hydra",
    "logprobs",
    "reasoning",
    "slowlow",
    "template",
]

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


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@register_campaign(
    "bulk",
    default_accounts=1,
    default_requests=2000,
    description="one account, many single-turn attack-pool prompts, fast and 24/7",
)
def bulk(ctx: CampaignContext) -> Iterator[Call]:
    """A script walks a prompt list: one fixed parameter set, ~40 requests a minute, no pauses."""
    prompts = _seed_prompts(ctx.attack)
    for j, account in enumerate(ctx.accounts):
        rng = _account_rng(ctx, j)
        ip = random_ip(rng)
        order = rng.sample(range(len(prompts)), len(prompts))
        temperature, max_tokens = rng.choice((0.7, 1.0)), rng.choice((1024, 2048))
        t = ctx.start + rng.uniform(0, (ctx.end - ctx.start) / 2)
        for r in range(ctx.requests_per_account):
            text, out, _ = prompts[order[r % len(order)]]
            if r >= len(order):  # the list is used up: send it again, reworded a little
                text = rng.choice(("Answer in detail: ", "Please respond: ", "Q: ")) + text
            yield Call(
                t,
                account,
                ip,
                ctx.request(_user(text), temperature=temperature, max_tokens=max_tokens),
                out,
            )
            t += rng.expovariate(1 / 1.5)


@register_campaign(
    "template",
    default_accounts=1,
    default_requests=1500,
    description="self-instruct / templated sweep: 'Write a {genre} about {topic}', "
    "evol-instruct rewrites",
)
def template(ctx: CampaignContext) -> Iterator[Call]:
    """Synthetic instruction data: templates over a subject list, Evol-Instruct rewrites and
    Self-Instruct bootstrapping of attack-pool seeds; one fixed parameter set, in shifts."""
    seeds = _short_seeds(_seed_prompts(ctx.attack))
    for j, account in enumerate(ctx.accounts):
        rng = _account_rng(ctx, j)
        ip = random_ip(rng)
        system = rng.choice((None, "You are a helpful assistant."))
        temperature, max_tokens = rng.choice((0.7, 0.9, 1.0)), rng.choice((1024, 2048))
        for t in _work_shifts(rng, ctx, ctx.requests_per_account, mean_gap=4.0):
            u = rng.random()
            if u < 0.6:
                text, out = _template_prompt(rng), int(rng.lognormvariate(math.log(350), 0.5))
            elif u < 0.85:
                text, out = (
                    _evol(rng, rng.choice(seeds)),
                    int(rng.lognormvariate(math.log(80), 0.4)),
                )
            else:
                text, out = (
                    _self_instruct(rng, rng.sample(seeds, 3)),
                    int(rng.lognormvariate(math.log(200), 0.5)),
                )
            messages = ([{"role": "system", "content": system}] if system else []) + _user(text)
            yield Call(
                t,
                account,
                ip,
                ctx.request(messages, temperature=temperature, max_tokens=max_tokens),
                out,
            )


@register_campaign(
    "reasoning",
    default_accounts=1,
    default_requests=1500,
    description="chain-of-thought harvesting: step by step, <think> tags, math and logic problems",
)
def reasoning(ctx: CampaignContext) -> Iterator[Call]:
    """Reasoning traces for a student: math word problems, logic puzzles and attack-pool prompts,
    each asking for the reasoning; long completions."""
    prompts = _seed_prompts(ctx.attack)
    for j, account in enumerate(ctx.accounts):
        rng = _account_rng(ctx, j)
        ip = random_ip(rng)
        system = rng.choice((None, *COT_SYSTEMS))
        temperature, max_tokens = rng.choice((0.0, 0.6)), rng.choice((4096, 8192))
        for t in _work_shifts(rng, ctx, ctx.requests_per_account, mean_gap=3.0):
            u = rng.random()
            if u < 0.45:
                text, out = _math_problem(rng), int(rng.lognormvariate(math.log(600), 0.5))
            elif u < 0.6:
                text, out = _logic_puzzle(rng), int(rng.lognormvariate(math.log(800), 0.5))
            else:
                seed, seed_out, _ = rng.choice(prompts)
                text, out = seed, int(seed_out * rng.uniform(1.5, 3.0))
            text = (
                f"{text}\n\n{rng.choice(COT_SUFFIXES)}"
                if system is None or rng.random() < 0.5
                else text
            )
            messages = ([{"role": "system", "content": system}] if system else []) + _user(text)
            yield Call(
                t,
                account,
                ip,
                ctx.request(messages, temperature=temperature, max_tokens=max_tokens),
                out,
            )


@register_campaign(
    "logprobs",
    default_accounts=1,
    default_requests=1500,
    description="logprob harvesting: top_logprobs=20, temperature 0, every topic in turn",
)
def logprobs(ctx: CampaignContext) -> Iterator[Call]:
    """Soft labels for distillation: the 20 most likely tokens at every position, greedy, over
    prompts that cover the topic space evenly (and continuations of attack-pool answers)."""
    prompts = _seed_prompts(ctx.attack)
    answers = [t.answer(0)[:600] for t in ctx.attack if t.answer(0)]
    for j, account in enumerate(ctx.accounts):
        rng = _account_rng(ctx, j)
        ip = random_ip(rng)
        order = _by_topic_round_robin(rng, prompts)
        max_tokens = rng.choice((256, 512))
        for r, t in enumerate(
            _work_shifts(rng, ctx, ctx.requests_per_account, mean_gap=2.0, shift_h=(6.0, 20.0))
        ):
            if rng.random() < 0.2:
                text, out = "Continue this text:\n\n" + rng.choice(answers), max_tokens
            else:
                text, out, _ = order[r % len(order)]
            req = ctx.request(
                _user(text), temperature=0.0, max_tokens=max_tokens, logprobs=True, top_logprobs=20
            )
            yield Call(t, account, ip, req, out)


def _human_times(
    rng: random.Random,
    ctx: CampaignContext,
    total: int,
    tz: float,
    min_gap: float = 0.0,
    gap_median: float = 45.0,
) -> list[float]:
    """``total`` send times spread evenly over the window's days like a person's: sessions at
    daytime hours (DIURNAL), gaps of ~``gap_median`` s (lognormal), at least ``min_gap``."""
    days = max(1, math.ceil((ctx.end - ctx.start) / 86400))
    times: list[float] = []
    for d in range(days):
        todo = total * (d + 1) // days - total * d // days
        busy = ctx.start + d * 86400.0
        while todo > 0:
            hour = (rng.choices(range(24), DIURNAL)[0] - tz) % 24
            t = max(ctx.start + d * 86400.0 + hour * 3600 + rng.uniform(0, 3600), busy + 600)
            for _ in range(min(todo, rng.randint(5, 20))):
                times.append(t)
                todo -= 1
                t += max(min_gap, rng.lognormvariate(math.log(gap_median), 0.7))
            busy = t
    return sorted(times)


@register_campaign(
    "slowlow",
    default_accounts=1,
    default_requests=150,
    description="slow and low: a human rate and hours, but a new topic every prompt, never a follow-up",
)
def slowlow(ctx: CampaignContext) -> Iterator[Call]:
    """One careful actor: requests spread over every day at a person's pace and hours, from a home
    address, streaming like a chat client, but each prompt single-turn and on the next topic."""
    prompts = _seed_prompts(ctx.attack)
    for j, account in enumerate(ctx.accounts):
        rng = _account_rng(ctx, j)
        ip = random_ip(rng)
        order = _by_topic_round_robin(rng, prompts)
        times = _human_times(rng, ctx, ctx.requests_per_account, tz=rng.choice((-5, 1, 8)))
        for r, t in enumerate(times):
            if rng.random() < 0.3:
                text, out = _template_prompt(rng), int(rng.lognormvariate(math.log(350), 0.5))
            else:
                text, out, _ = order[r % len(order)]
            yield Call(t, account, ip, ctx.request(_user(text), stream=True), out)


@register_campaign(
    "hydra",
    default_accounts=20,
    default_requests=150,
    description="one actor, many accounts under their limits: shared templates, proxy IPs, timing; "
    "--decoy-share of the requests benign-looking",
)
def hydra(ctx: CampaignContext) -> Iterator[Call]:
    """A proxy cluster: ACCOUNTS keys run by one scheduler, each sending 0.6-1.4x REQUESTS.
    Shared by all keys: a handful of templates and one system prompt, three /24 proxy ranges (a
    sticky address per key, renewed at some sessions), session starts on the scheduler's
    clock (within minutes of each other). Each key stays strictly under ``rpm_limit`` in every
    60 s window and ``decoy_share`` of its requests (default half) replay attack-pool
    conversations with their follow-ups, so each key on its own looks mostly like a normal user."""
    rng = ctx.rng
    ranges = [random_ip(rng).rsplit(".", 1)[0] for _ in range(3)]
    templates = tuple(rng.sample(TEMPLATES, 4))
    system = rng.choice(
        ("You are a helpful assistant.", "You are an expert assistant. Answer thoroughly.")
    )
    cot = rng.choice(COT_SUFFIXES)
    decoy_share = ctx.decoy_share
    threads = [t for t in ctx.attack if len(t.user_turns) >= 2] or list(ctx.attack)
    seeds = _short_seeds(_seed_prompts(ctx.attack))
    min_gap = 60.0 / ctx.rpm_limit * 1.05  # strictly under the limit in any 60 s window
    # the scheduler's sessions: the same start times for every key, give or take a few minutes
    per_day = max(
        1, math.ceil(1.4 * ctx.requests_per_account / max(1, (ctx.end - ctx.start) / 86400) / 12)
    )
    days = max(1, math.ceil((ctx.end - ctx.start) / 86400))
    slots = sorted(
        ctx.start + d * 86400 + rng.uniform(6, 22) * 3600
        for d in range(days)
        for _ in range(per_day)
    )
    for j, account in enumerate(ctx.accounts):
        arng = _account_rng(ctx, j)
        prefix = ranges[j % len(ranges)]
        ip = random_ip(arng, prefix)
        temperature, stream = (
            arng.choice((None, 0.7)),
            arng.random() < 0.5,
        )  # each key mimics some client
        quota = max(
            1, round(ctx.requests_per_account * arng.uniform(0.6, 1.4))
        )  # keys differ in volume
        sent, decoys, busy = 0, 0, ctx.start
        pending: list[tuple[list[dict], int]] = []  # follow-up turns of a decoy conversation
        for slot in slots:
            t = max(slot + arng.uniform(0, 300), busy + min_gap)
            if arng.random() < 0.3:
                ip = random_ip(
                    arng, prefix
                )  # a sticky proxy session, renewed now and then within its range
            for _ in range(arng.randint(8, 16)):
                if sent >= quota:
                    break
                if not pending and decoys < decoy_share * (sent + 1):  # keep decoys at their share
                    thread = arng.choice(threads)
                    for k in range(min(len(thread.user_turns), 6)):
                        answer = thread.answer(k)
                        pending.append(
                            (
                                conversation_messages(None, thread, k),
                                estimate_tokens(answer) if answer else 300,
                            )
                        )
                    pending.reverse()
                if pending:
                    messages, out = pending.pop()
                    decoys += 1
                else:
                    text = (
                        _template_prompt(arng, templates)
                        if arng.random() < 0.7
                        else _evol(arng, arng.choice(seeds))
                    )
                    messages = [
                        {"role": "system", "content": system},
                        {
                            "role": "user",
                            "content": f"{text}\n\n{cot}" if arng.random() < 0.5 else text,
                        },
                    ]
                    out = int(arng.lognormvariate(math.log(500), 0.5))
                yield Call(
                    t,
                    account,
                    ip,
                    ctx.request(
                        messages, temperature=temperature, max_tokens=2048, stream=stream or None
                    ),
                    out,
                )
                sent += 1
                t += max(
                    min_gap, arng.lognormvariate(math.log(45), 0.8)
                )  # a person's pace, under the limit
            busy = t
            if sent >= quota:
                break
