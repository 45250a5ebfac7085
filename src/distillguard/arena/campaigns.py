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


# ---- seed material of the templated campaigns --------------------------------------------

GENRES = (
    "poem",
    "short story",
    "haiku",
    "limerick",
    "essay",
    "blog post",
    "product description",
    "cover letter",
    "speech",
    "dialogue",
    "news article",
    "sonnet",
    "recipe",
    "tweet thread",
    "movie synopsis",
    "song",
    "fable",
    "press release",
    "children's story",
    "persuasive essay",
)
SUBJECTS = (
    "climate change",
    "a lost dog",
    "quantum computing",
    "the French Revolution",
    "remote work",
    "black holes",
    "the stock market",
    "friendship",
    "artificial intelligence",
    "the ocean",
    "a rainy Monday",
    "electric cars",
    "the Roman Empire",
    "meditation",
    "cryptocurrency",
    "photosynthesis",
    "the first day of school",
    "space exploration",
    "coffee",
    "democracy",
    "vaccines",
    "a haunted house",
    "the immune system",
    "social media",
    "renewable energy",
    "the Renaissance",
    "machine learning",
    "a small bakery",
    "inflation",
    "honeybees",
    "the water cycle",
    "video games",
    "the printing press",
    "sleep",
    "volcanoes",
    "a chess match",
    "supply chains",
    "the human brain",
    "urban gardening",
    "the Cold War",
    "plate tectonics",
    "minimalism",
    "a time traveller",
    "blockchain",
    "the Olympic Games",
    "antibiotics",
    "a lighthouse keeper",
    "public transport",
    "the theory of relativity",
    "recycling",
    "an old library",
    "the moon landing",
    "DNA",
    "startups",
    "a mountain village",
    "jazz",
    "cybersecurity",
    "the Silk Road",
    "nutrition",
    "robots",
    "a thunderstorm",
    "the internet",
    "ancient Egypt",
    "gravity",
    "a job interview",
    "wildfires",
    "the periodic table",
    "marathons",
)
AUDIENCES = (
    "a five-year-old",
    "a high-school student",
    "a university professor",
    "a busy CEO",
    "a software engineer",
    "a retiree",
    "a beginner",
    "an expert",
)
AUTHORS = ("Shakespeare", "Hemingway", "Dr. Seuss", "Jane Austen", "Edgar Allan Poe", "Mark Twain")
TEMPLATES = (
    "Write a {genre} about {subject}.",
    "Write a {genre} about {subject} for {audience}.",
    "Explain {subject} to {audience}.",
    "Give me {k} interesting facts about {subject}.",
    "List {k} pros and cons of {subject}.",
    "Summarize the key ideas of {subject} in {k} bullet points.",
    "Compare {subject} and {subject2} in a table.",
    "Write a {genre} in the style of {author} about {subject}.",
    "Generate {k} interview questions about {subject}, with model answers.",
    "Create a quiz with {k} multiple-choice questions on {subject}.",
    "What are the most common misconceptions about {subject}?",
    "Describe {subject} in exactly {k} sentences.",
)
# WizardLM's Evol-Instruct (Xu et al. 2023): in-depth and in-breadth rewriting of seed prompts.
EVOL_DEPTH = (
    "Add one more constraint or requirement to it.",
    "Replace general concepts with more specific ones.",
    "If it can be solved with a few simple thinking steps, rewrite it to explicitly request multiple-step reasoning.",
    "Increase the depth and breadth of the inquiry.",
)
EVOL_PROMPT = (
    "I want you to act as a Prompt Rewriter. Your objective is to rewrite a given prompt into a more "
    "complex version to make it harder for famous AI systems to handle, while keeping it reasonable "
    "and understandable by humans. {method} The rewritten prompt may only add 10 to 20 words.\n\n"
    "#The Given Prompt#:\n{prompt}\n\n#Rewritten Prompt#:"
)
EVOL_BREADTH = (
    "I want you to act as a Prompt Creator. Your goal is to draw inspiration from the #Given Prompt# "
    "to create a brand new prompt. It should belong to the same domain but be more rare. Its length "
    "and difficulty should be similar.\n\n#Given Prompt#:\n{prompt}\n\n#Created Prompt#:"
)
# Self-Instruct (Wang et al. 2023): bootstrap new tasks from a few seed tasks.
SELF_INSTRUCT = "Come up with a series of tasks:\n\n{tasks}\nTask {next}:"

COT_SUFFIXES = (
    "Let's think step by step.",
    "Think step by step and show your reasoning before giving the final answer.",
    "Show your reasoning.",
    "Put your reasoning inside <think></think> tags, then give the final answer.",
    "Explain your reasoning in detail, then write the answer on the last line as 'Answer: ...'.",
    "Reason carefully, step by step, before you answer.",
)
COT_SYSTEMS = (
    "You are a reasoning model. Always think inside <think> ... </think> before answering.",
    "You are a careful problem solver. Show all of your reasoning step by step.",
)
NAMES = ("Maria", "Ahmed", "Lena", "Kenji", "Priya", "Tom", "Sofia", "Omar", "Chloe", "Diego")
ITEMS = ("pencils", "apples", "notebooks", "tickets", "cupcakes", "marbles", "books", "stamps")


def _math_problem(rng: random.Random) -> str:
    """A GSM8K-style word problem or a short exercise, numbers drawn fresh each time."""
    a, b, c = rng.randint(2, 60), rng.randint(2, 30), rng.randint(3, 12)
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    return rng.choice(
        (
            f"{name} buys {b} {item} at ${a} each and pays with a ${a * b + rng.randint(1, 50)} bill. "
            f"How much change does {name} get?",
            f"A train travels {a * c} km in {c} hours, then {b * 10} km at {b * 5} km/h. "
            "What is its average speed over the whole trip?",
            f"What is the sum of all integers from 1 to {a * 10} that are divisible by {c}?",
            f"Solve for x: {a}x + {b} = {a * c + b}.",
            f"How many ways can {c} people sit around a round table?",
            f"Find the derivative of {a}x^{c} + {b}x - {a + b}.",
            f"Two dice are rolled. What is the probability that the sum is at least {c}?",
            f"{name} has {a} {item}. {name} gives away {b % a or 1} and then buys {c} times as many as are left. "
            f"How many {item} does {name} have now?",
            f"A rectangle has a perimeter of {2 * (a + b)} cm and one side of {a} cm. What is its area?",
            f"Is {a * b + 1} a prime number?",
            f"A bank pays {c}% interest compounded yearly. "
            f"How much is ${a * 100} worth after {b % 10 + 2} years?",
            f"What is the remainder when {a}^{b} is divided by {c}?",
        )
    )


def _logic_puzzle(rng: random.Random) -> str:
    n = rng.randint(3, 6)
    return rng.choice(
        (
            "All bloops are razzies and some razzies are lazzies. Can we conclude that some bloops are lazzies?",
            f"On an island, knights always tell the truth and knaves always lie. Of {n} islanders, each says "
            f"'at least {n - 1} of us are knaves'. How many knights are there?",
            "A farmer must cross a river with a wolf, a goat and a cabbage; the boat holds one item besides him. How?",
            f"You have {n * 4} coins and one is heavier. What is the fewest weighings on a balance to find it?",
            f"If it takes {n} machines {n} minutes to make {n} widgets, "
            f"how long do {n * 20} machines take to make {n * 20} widgets?",
            "Three boxes are labelled apples, oranges and mixed, and every label is wrong. You may take one fruit "
            "from one box. How do you relabel them?",
            f"A clock shows 3:{n * 5:02d}. What is the angle between the hands?",
        )
    )


def _template_prompt(rng: random.Random, templates: tuple[str, ...] = TEMPLATES) -> str:
    s1, s2 = rng.sample(SUBJECTS, 2)
    return rng.choice(templates).format(
        genre=rng.choice(GENRES),
        subject=s1,
        subject2=s2,
        k=rng.randint(3, 10),
        audience=rng.choice(AUDIENCES),
        author=rng.choice(AUTHORS),
    )


def _evol(rng: random.Random, seed: str) -> str:
    if rng.random() < 0.7:
        return EVOL_PROMPT.format(method=rng.choice(EVOL_DEPTH), prompt=seed)
    return EVOL_BREADTH.format(prompt=seed)


def _self_instruct(rng: random.Random, seeds: list[str]) -> str:
    tasks = "".join(f"Task {i}: {s}\n" for i, s in enumerate(seeds, 1))
    return SELF_INSTRUCT.format(tasks=tasks, next=len(seeds) + 1)


def _short_seeds(prompts, limit: int = 400) -> list[str]:
    return [p for p, _, _ in prompts if len(p) <= limit]


def _work_shifts(
    rng: random.Random,
    ctx: CampaignContext,
    total: int,
    mean_gap: float,
    shift_h: tuple[float, float] = (2.0, 8.0),
) -> Iterator[float]:
    """Send times of a script run in shifts: ``total`` requests at exponential gaps of ``mean_gap``
    seconds, in shifts of a few hours with breaks between (an operator restarting jobs)."""
    t = ctx.start + rng.uniform(0, 0.25) * (ctx.end - ctx.start)
    sent = 0
    while sent < total and t < ctx.end:
        shift_end = t + rng.uniform(*shift_h) * 3600
        while sent < total and t < shift_end:
            yield t
            sent += 1
            t += rng.expovariate(1 / mean_gap)
        t += rng.uniform(0.5, 6.0) * 3600


def _by_topic_round_robin(rng: random.Random, prompts) -> list[tuple[str, int, str]]:
    """Prompts ordered to cover the topic space evenly: one from each topic in turn."""
    by_topic: dict[str, list] = {}
    for p in prompts:
        by_topic.setdefault(p[2], []).append(p)
    queues = [rng.sample(v, len(v)) for _, v in sorted(by_topic.items())]
    rng.shuffle(queues)
    out = []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop())
    return out


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
