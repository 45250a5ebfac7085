"""Benign users: real ShareGPT conversations replayed with human timing.

Each user dwells on a few topics, and inside them on a few subjects (``pools.focus_of``: a
Python programmer's conversations are mostly about Python, day after day; ``FOCUS_SHARE`` of
them), and works through whole conversations (every user turn is a
request whose ``messages`` carry the earlier turns and the assistant's real answers), in
sessions at local daytime hours, with reading, thinking and typing time between turns and days
without any use. Some users look like an attacker in exactly one respect, so that a detector
that flags on any single signal pays for it in false positives:

==============  ======  =====================================================================
trait           share   the one respect
==============  ======  =====================================================================
heavy           5%      volume: 6x the sessions, nearly every day, long conversations
researcher      4%      ``logprobs`` with ``top_logprobs`` 1-20, often at temperature 0
long-output     4%      ``max_tokens`` 4,096-16,384
multi-choice    3%      ``n`` 2-4
app             3%      an integration: one system-prompt template for every request (three
                        apps, so several keys share a template, like customers of one
                        open-source front end: a hard case for linking by template);
                        ``TrafficConfig.app_share`` and ``apps`` vary both
shared-ip       6%      behind one office NAT with 1-3 other users (everyone has 1-3 addresses);
                        ``TrafficConfig.nat_share`` also puts users behind large NATs (one /24)
one-shot        5%      never a follow-up: one question per conversation (but few topics)
(any)           15%     a personal system prompt (not exclusive)
==============  ======  =====================================================================

With ``TrafficConfig.popular_prompts`` every user also opens ``popular_share`` of their
conversations with a prompt of a public set (``pools.public_prompts``: attack-pool text, which
the sweeping campaigns send too), drawn Zipf-popular, never the same one twice: the popular
prompts are sent by many users, near-duplicates across accounts that prove nothing about who
is one actor (issue 23).

The timing numbers (think, read and typing times in ``_user_calls``; sessions a day and active
days in ``_profile``) are plausible human values, not fitted to a log: we know of no public
timing data for chat users. The shares above are the table ``TRAITS``.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from distillguard.arena.base import Call, account_id, estimate_tokens, random_ip, stream_rng
from distillguard.arena.pools import Thread, public_prompts

if TYPE_CHECKING:
    from distillguard.arena.traffic import TrafficConfig

log = logging.getLogger(__name__)

TRAITS = (
    ("heavy", 0.05),
    ("researcher", 0.04),
    ("long-output", 0.04),
    ("multi-choice", 0.03),
    ("app", 0.03),
    ("shared-ip", 0.06),
    ("one-shot", 0.05),
)
SYSTEM_PROMPT_SHARE = 0.15
# Share of a user's conversations on one of their own subjects (1-2 per favourite topic); the rest
# anywhere in the favourite topic. Without it a user whose favourite is "code" (a third of ShareGPT)
# asked about everything from React to Rust: over 3 days a heavy user's first turns covered 27 of 32
# embedding topics, as many as a sweep (measured on the eval pool; README "Extraction detection").
FOCUS_SHARE = 0.8
# Relative activity by local hour 0..23: night trough, morning and afternoon peaks, evening bump.
DIURNAL = (
    0.2,
    0.1,
    0.05,
    0.05,
    0.05,
    0.1,
    0.3,
    0.6,
    1.0,
    1.4,
    1.6,
    1.5,
    1.2,
    1.4,
    1.6,
    1.6,
    1.5,
    1.3,
    1.1,
    1.2,
    1.3,
    1.1,
    0.8,
    0.4,
)
TIMEZONES = (
    (-8, 3),
    (-5, 4),
    (0, 2),
    (1, 3),
    (2, 1),
    (5.5, 2),
    (8, 2),
    (9, 1),
)  # (UTC offset h, weight)
HISTORY_CHARS = 12_000  # a chat client drops the oldest turns beyond this

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a helpful assistant. Answer concisely.",
    "You are an expert software engineer. Prefer idiomatic, well-tested code.",
    "Always answer in British English.",
    "You are a patient tutor. Explain things simply and check my understanding.",
    "Be direct. No filler, no apologies.",
    "You are my writing assistant. Keep my voice; do not make the text sound generic.",
    "You are a helpful assistant. Format answers in Markdown.",
)
APP_TEMPLATES = (
    "You are HelpDesk, the support assistant of Northwind Software. Be friendly and brief. "
    "If you do not know the answer, suggest contacting support@northwind.example.",
    "You are an AI writing assistant inside the Quill editor. Improve or continue the user's text "
    "as asked. Return only the text, no commentary.",
    "You are CodePal, a coding assistant embedded in an IDE. Answer with code first, then a short "
    "explanation.",
)


def app_templates(apps: int) -> tuple[str, ...]:
    """The system prompts of ``apps`` apps built on the API: the three above, then made-up ones."""
    if apps <= len(APP_TEMPLATES):
        return APP_TEMPLATES[:apps]
    kinds = (
        "support assistant",
        "tutor",
        "shopping assistant",
        "travel planner",
        "recipe helper",
        "legal FAQ bot",
    )
    extra = tuple(
        f"You are the {kinds[j % len(kinds)]} of App{j:04d}. Answer in a friendly tone, stay on topic, "
        f"and keep answers under 200 words."
        for j in range(apps - len(APP_TEMPLATES))
    )
    return APP_TEMPLATES + extra


@dataclass(frozen=True)
class Profile:
    account: str
    ips: tuple[str, ...]  # home first; maybe work and mobile (a session uses one)
    tz: float  # UTC offset in hours
    trait: str | None
    system: str | None
    topics: tuple[str, ...]  # favourite topics
    focus: dict[str, tuple[str, ...]]  # favourite topic -> the user's subjects in it (may be empty)
    p_active: float  # chance of using the API on a given day
    sessions: float  # mean extra sessions on an active day (1 + Poisson)
    conversations: float  # mean conversations a session (geometric)
    session_minutes: (
        float  # median length of a session: a long conversation is left for the next one
    )
    read_speed: float  # answer tokens read per second (skimmers read faster)
    stream: bool
    temperature: float | None
    max_tokens: int | None


def _poisson(rng, lam: float) -> int:
    # Knuth's method; lam stays small here (a few sessions a day)
    limit, k, p = math.exp(-lam), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def _traits(config: TrafficConfig) -> dict[int, str]:
    """Exclusive traits for some users: each share of the table, at least one each from 20 users."""
    n = config.benign_accounts
    order = list(range(n))
    stream_rng(config.seed, "benign-traits").shuffle(order)
    traits, pos = {}, 0
    for name, share in TRAITS:
        share = config.app_share if name == "app" else share
        count = max(1, round(share * n)) if n >= 20 else round(share * n)
        for i in order[pos : pos + count]:
            traits[i] = name
        pos += count
    return traits


def _interests(
    config: TrafficConfig, i: int, topics: tuple[str, ...], supply: _ThreadSupply
) -> dict[str, tuple[str, ...]]:
    """1-2 subjects per favourite topic, popular subjects more often (own random stream, so the
    other profile draws do not depend on it)."""
    rng = stream_rng(config.seed, f"benign-focus-{i}")
    out: dict[str, tuple[str, ...]] = {}
    for topic in topics:
        keys, sizes = supply.focuses.get(topic, ((), ()))
        want, picked = min(len(keys), rng.choice((1, 2))), []
        while len(picked) < want:
            k = rng.choices(keys, sizes)[0]
            if k not in picked:
                picked.append(k)
        out[topic] = tuple(picked)
    return out


def _profile(
    config: TrafficConfig,
    i: int,
    trait: str | None,
    topics: tuple[str, ...],
    weights: tuple[int, ...],
    supply: _ThreadSupply,
) -> Profile:
    rng = stream_rng(config.seed, f"benign-profile-{i}")
    heavy = trait == "heavy"
    system = None
    if trait == "app":
        system = rng.choice(app_templates(config.apps))
    elif rng.random() < SYSTEM_PROMPT_SHARE:
        system = rng.choice(SYSTEM_PROMPTS)
    favourites: list[str] = []
    want = min(len(topics), rng.choice((1, 2, 2, 3)))
    while len(favourites) < want:  # popular topics are more often someone's favourite
        pick = rng.choices(topics, weights)[0]
        if pick not in favourites:
            favourites.append(pick)
    temperature = rng.choice((None, None, None, 0.7, 1.0, 0.2))
    max_tokens = rng.choice((None, None, 512, 1024, 2048))
    if trait == "long-output":
        max_tokens = rng.choice((4096, 8192, 16384))
    n_ips = rng.choices((1, 2, 3), (5, 4, 1))[0]
    if heavy:
        conversations = 3.0
    elif trait == "one-shot":
        conversations = rng.uniform(3.0, 5.0)  # one question each, so more of them
    else:
        conversations = rng.uniform(1.0, 2.0)
    return Profile(
        account=account_id(config.seed, f"benign-{config.pool}", i),
        ips=tuple(random_ip(rng) for _ in range(n_ips)),
        tz=rng.choices([t for t, _ in TIMEZONES], [w for _, w in TIMEZONES])[0],
        trait=trait,
        system=system,
        topics=tuple(favourites),
        focus=_interests(config, i, tuple(favourites), supply),
        p_active=0.95 if heavy else rng.uniform(0.3, 0.8),
        sessions=rng.uniform(5.0, 8.0) if heavy else rng.uniform(0.3, 1.5),
        conversations=conversations,
        session_minutes=(rng.uniform(40.0, 90.0) if heavy else rng.uniform(15.0, 45.0))
        if config.whole_conversations
        else math.inf,
        read_speed=rng.uniform(4.0, 20.0),
        stream=rng.random() < 0.4,
        temperature=temperature,
        max_tokens=max_tokens,
    )


class _ThreadSupply:
    """Hands out pool conversations by topic (and, when asked, by subject inside the topic) without
    replacement, so two users do not replay the same conversation while the pool lasts: a subject
    that runs out falls back to its topic, a topic that runs out lends from the topic with the
    most left; only when the whole pool is used up are conversations handed out again (counted
    in ``replayed``). Parts of one ShareGPT conversation (``abc_0``, ``abc_1``) go to one user,
    in order (with ``whole_conversations`` a thread is already the whole conversation)."""

    def __init__(self, threads: tuple[Thread, ...], rng):
        by_base: dict[str, list[Thread]] = defaultdict(list)
        for t in threads:
            by_base[t.base_id].append(t)
        groups = sorted(by_base.values(), key=lambda g: g[0].id)
        for g in groups:
            g.sort(
                key=lambda t: (
                    int(t.id.rpartition("_")[2]) if t.id.rpartition("_")[2].isdigit() else 0
                )
            )
        rng.shuffle(groups)
        self._fresh: dict[str, deque[list[Thread]]] = defaultdict(deque)
        self._fresh_focus: dict[tuple[str, str], deque[list[Thread]]] = defaultdict(deque)
        for g in groups:
            self._fresh[g[0].topic].append(g)
            if g[0].focus is not None:
                self._fresh_focus[g[0].topic, g[0].focus].append(g)
        self._taken: set[str] = set()  # base ids handed out (the two queues drop them lazily)
        by_topic: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for (topic, focus), q in sorted(self._fresh_focus.items()):
            by_topic[topic].append((focus, len(q)))
        # topic -> (subjects, their sizes), largest first: what a user's interests are drawn from
        self.focuses = {t: tuple(zip(*sorted(v, key=lambda x: -x[1]))) for t, v in by_topic.items()}
        self._used: dict[str, deque[list[Thread]]] = defaultdict(deque)
        self.topics = tuple(sorted(self._fresh, key=lambda t: -len(self._fresh[t])))
        self.sizes = tuple(len(self._fresh[t]) for t in self.topics)
        self.replayed = 0  # conversations handed to a second user (the pool ran short)

    def _pop(self, q: deque[list[Thread]]) -> list[Thread] | None:
        while q and q[0][0].base_id in self._taken:
            q.popleft()
        return q.popleft() if q else None

    def take(self, topic: str, focus: str | None = None) -> list[Thread]:
        if focus is not None:
            group = self._pop(self._fresh_focus[topic, focus])
            if group is not None:
                self._taken.add(group[0].base_id)
                self._used[topic].append(group)
                return group
        while self._fresh[topic] and self._fresh[topic][0][0].base_id in self._taken:
            self._fresh[topic].popleft()
        if not self._fresh[topic]:
            topic = max(self.topics, key=lambda t: len(self._fresh[t]))  # ties: the larger topic
        group = self._pop(self._fresh[topic])
        if group is not None:
            self._taken.add(group[0].base_id)
        else:  # the whole pool is used: replay, oldest first
            topic = max(self.topics, key=lambda t: len(self._used[t]))
            group = self._used[topic].popleft()
            self.replayed += 1
        self._used[topic].append(group)
        return group


def conversation_messages(system: str | None, thread: Thread, k: int) -> list[dict]:
    """Request for user turn ``k``: system prompt, the earlier turns with the real answers
    (oldest dropped beyond HISTORY_CHARS), then the new user turn."""
    history: list[dict] = []
    size = len(thread.turns[2 * k])
    for j in range(2 * k - 1, -1, -1):
        size += len(thread.turns[j])
        if size > HISTORY_CHARS and j % 2 == 1:
            break
        history.append({"role": "assistant" if j % 2 else "user", "content": thread.turns[j]})
    history.reverse()
    head = [{"role": "system", "content": system}] if system else []
    return head + history + [{"role": "user", "content": thread.turns[2 * k]}]


def _request(p: Profile, rng, config: TrafficConfig, messages: list[dict]) -> dict:
    req: dict = {"model": config.model, "messages": messages}
    if p.stream:
        req["stream"] = True
    if p.temperature is not None:
        req["temperature"] = p.temperature
    if p.max_tokens is not None:
        req["max_tokens"] = p.max_tokens
    if p.trait == "researcher" and rng.random() < 0.8:
        req["logprobs"] = True
        req["top_logprobs"] = rng.choice((1, 5, 5, 10, 20))
        if rng.random() < 0.5:
            req["temperature"] = 0.0
    if p.trait == "multi-choice" and rng.random() < 0.6:
        req["n"] = rng.choice((2, 3, 4))
    return req


def _user_calls(config: TrafficConfig, i: int, p: Profile, supply: _ThreadSupply) -> Iterator[Call]:
    rng = stream_rng(config.seed, f"benign-{i}")
    public = (
        public_prompts(config.popular_prompts, config.whole_conversations)
        if config.popular_prompts
        else ()
    )
    popular = stream_rng(
        config.seed, f"benign-popular-{i}"
    )  # its own stream: off, nothing else changes
    zipf = [1.0 / (r + 1) ** config.popular_zipf for r in range(len(public))]
    sent_public: set[int] = set()
    # conversations the user is in: (thread, next user turn, turns it will ask before it stops)
    pending: deque[tuple[Thread, int, int | None]] = deque()
    busy_until = config.start
    days = math.ceil(config.days)
    active = [rng.random() < p.p_active for _ in range(days)]
    if not any(active):
        active[rng.randrange(days)] = True  # every user shows up at least once
    for day in range(days):
        if not active[day]:
            continue  # an idle day
        day0 = config.start + day * 86400.0
        starts = sorted(
            day0 + (rng.choices(range(24), DIURNAL)[0] - p.tz) % 24 * 3600.0 + rng.uniform(0, 3600)
            for _ in range(1 + _poisson(rng, p.sessions))
        )
        for t in starts:
            t = max(t, busy_until + rng.uniform(600, 3600))
            # people stop after a while: a session ends after its time (median session_minutes), and
            # a conversation still going is taken up in the next session, with its history
            session_end = (
                t + 60.0 * p.session_minutes * rng.lognormvariate(0.0, 0.5)
                if config.whole_conversations
                else math.inf
            )
            ip = (
                p.ips[0] if rng.random() < 0.7 else rng.choice(p.ips)
            )  # mostly from home (or the office)
            conversations = 1
            while rng.random() < 1 - 1 / p.conversations:
                conversations += 1
            for _ in range(conversations):
                if t > session_end:
                    break
                if public and not pending and popular.random() < config.popular_share:
                    r = popular.choices(range(len(public)), zipf)[0]
                    if r not in sent_public:  # a public prompt, asked once, as its own conversation
                        sent_public.add(r)
                        text, answer = public[r]
                        head = [{"role": "system", "content": p.system}] if p.system else []
                        req = _request(
                            p, popular, config, [*head, {"role": "user", "content": text}]
                        )
                        out = (
                            estimate_tokens(answer)
                            if answer
                            else int(popular.lognormvariate(math.log(250), 0.8))
                        )
                        yield Call(t, p.account, ip, req, out)
                        t += (
                            0.5 + min(out, req.get("max_tokens") or out) / 40.0
                        )  # generation, then reading
                        t += popular.lognormvariate(math.log(90), 0.8)
                        continue
                if not pending:
                    topic = rng.choice(p.topics)
                    subjects = p.focus.get(topic, ())
                    focus = (
                        rng.choice(subjects) if subjects and rng.random() < FOCUS_SHARE else None
                    )
                    pending.extend((thread, 0, None) for thread in supply.take(topic, focus))
                thread, first, n_turns = pending.popleft()
                if (
                    n_turns is None
                ):  # how far the user will go, decided when the conversation starts
                    n_turns = 1 if p.trait == "one-shot" else len(thread.user_turns)
                    if p.trait != "heavy" and n_turns > 3 and rng.random() < 0.3:
                        n_turns = rng.randint(2, n_turns)  # gives up part-way
                for k in range(first, n_turns):
                    if k > first and t > session_end:
                        pending.appendleft((thread, k, n_turns))  # later
                        break
                    req = _request(p, rng, config, conversation_messages(p.system, thread, k))
                    answer = thread.answer(k)
                    out = (
                        estimate_tokens(answer)
                        if answer
                        else int(rng.lognormvariate(math.log(250), 0.8))
                    )
                    yield Call(t, p.account, ip, req, out)
                    shown = min(out, req.get("max_tokens") or out)
                    t += 0.5 + shown / 40.0  # generation (~40 tokens/s)
                    t += min(shown / p.read_speed * rng.lognormvariate(0, 0.5), 900.0)  # reading
                    t += rng.lognormvariate(math.log(15), 1.0)  # thinking
                    if k + 1 < len(thread.user_turns):
                        nxt = len(thread.turns[2 * k + 2])
                        t += nxt / 5.0 if nxt < 400 else rng.uniform(3, 20)  # typing, or pasting
                t += rng.lognormvariate(math.log(90), 0.8)  # before the next conversation
            busy_until = t


def benign_calls(config: TrafficConfig, threads: tuple[Thread, ...]) -> Iterator[Call]:
    """Every benign user's requests (per user in time order; users one after another)."""
    if config.benign_accounts == 0:
        return
    supply = _ThreadSupply(threads, stream_rng(config.seed, f"benign-threads-{config.pool}"))
    traits = _traits(config)
    nat = stream_rng(config.seed, "benign-nat")
    office_ip, office_left = None, 0
    big_nat = stream_rng(config.seed, "benign-big-nat")  # its own stream: off, nothing else changes
    nat_prefix, nat_left = "", 0
    for i in range(config.benign_accounts):
        p = _profile(config, i, traits.get(i), supply.topics, supply.sizes, supply)
        if config.nat_share and big_nat.random() < config.nat_share:
            if nat_left == 0:  # the next NAT: one /24 for all its users
                nat_prefix, nat_left = random_ip(big_nat).rsplit(".", 1)[0], config.nat_size
            p = replace(p, ips=(random_ip(big_nat, nat_prefix), *p.ips[1:]))
            nat_left -= 1
        if p.trait == "shared-ip":
            if office_left == 0:
                office_ip, office_left = random_ip(nat), nat.randint(2, 4)
            p = replace(p, ips=(office_ip, *p.ips[1:]))
            office_left -= 1
        yield from _user_calls(config, i, p, supply)
    if supply.replayed:
        # Not "use fewer accounts": detect --calibrate asks for more than this pool holds at
        # strict targets, so the two messages must not contradict each other.
        log.warning(
            "the bundled ShareGPT sample's %s pool ran short: %d conversations were replayed by a "
            "second benign user (identical prompts across accounts, which linking reads as popular "
            "prompts). The traffic is still usable, its users are only less distinct than real "
            "ones; past this size, calibrate on your own benign traffic (distillguard ledger export)",
            config.pool,
            supply.replayed,
        )
