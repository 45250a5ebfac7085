"""The bundled ShareGPT conversations split into three disjoint pools, with coarse topics.

::

    benign-calibration   40%   benign users of a calibration file (what a detector fits on)
    benign-eval          35%   benign users of an evaluation file (held-out accounts)
    attack               25%   seed material of attack campaigns

ShareGPT cuts long conversations into parts ``abc_0``, ``abc_1``, ...; with ``whole=True`` they
are joined back into one conversation (``_whole_conversations``). A conversation's pool is a hash
of its base id, so the split does not depend on the seed, the order of the file or the number of
accounts, and all parts stay in one pool. Hashing ids alone is not enough: the
same text recurs under different ids ("hi" 50 times, "Explain quantum computing in simple
terms" 43 times). So, by text (normalised: case and whitespace folded):

- an eval conversation whose first user turn also opens a calibration conversation is dropped;
- an attack conversation is cut before its first user turn that appears anywhere in a benign
  pool, and dropped if that is its first turn. No user text an attacker can send is in a
  benign pool.

Topics are a keyword classifier over the first user turn (and the start of the answer):
hand-written on purpose. It costs microseconds a conversation with no fit, the same on every
machine, and the labels are readable ("code", "health"). TF-IDF + k-means on these prompts took
~15 s on 2 cores and gave clusters such as "'continue' '번역결과' 'step'". Detectors never see
these labels; they only give benign users a few favourite topics and let sweeping campaigns
cover all topics evenly.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from distillguard.data.sharegpt import iter_conversations

PoolName = Literal["calibration", "eval", "attack"]
POOLS: tuple[PoolName, ...] = ("calibration", "eval", "attack")
_SPLIT = (40, 75)  # hash % 100 below 40: calibration; below 75: eval; else attack
_SALT = b"distillguard-arena-pools-v1"
MAX_MESSAGE_CHARS = 6000  # longer turns are cut (a few pasted 100k-character documents)

# topic -> keywords (word starts, case-insensitive); the first topic with most hits wins.
TOPIC_KEYWORDS: dict[str, tuple[str, ...]] = {
    "code": (
        "python",
        "javascript",
        "java ",
        "code",
        "function",
        "sql",
        "api",
        "html",
        "css",
        "react",
        "typescript",
        "c#",
        "c++",
        "golang",
        "rust",
        "bug",
        "error",
        "compile",
        "class ",
        "docker",
        "kubernetes",
        "git",
        "script",
        "program",
        "algorithm",
        "database",
        "node",
        "django",
        "flask",
        "regex",
        "json",
        "bash",
        "linux",
        "aws",
        "server",
        "frontend",
        "backend",
    ),
    "data-ml": (
        "machine learning",
        "neural",
        "model",
        "dataset",
        "pandas",
        "numpy",
        "tensorflow",
        "pytorch",
        "regression",
        "classification",
        "data science",
        "statistic",
        "training",
        "deep learning",
        "nlp",
        "gpt",
        "ai ",
    ),
    "math": (
        "math",
        "equation",
        "calculate",
        "probability",
        "integral",
        "derivative",
        "algebra",
        "geometry",
        "theorem",
        "proof",
        "solve",
        "matrix",
        "number",
    ),
    "science": (
        "physics",
        "chemistry",
        "biology",
        "quantum",
        "climate",
        "energy",
        "molecule",
        "experiment",
        "planet",
        "evolution",
        "science",
    ),
    "business": (
        "marketing",
        "business",
        "startup",
        "customer",
        "sales",
        "brand",
        "product",
        "company",
        "strategy",
        "market",
        "seo",
        "ecommerce",
        "client",
        "linkedin",
        "social media",
        "campaign",
        "revenue",
        "pitch",
    ),
    "finance": (
        "invest",
        "stock",
        "finance",
        "tax",
        "bank",
        "money",
        "crypto",
        "loan",
        "budget",
        "accounting",
        "price",
    ),
    "writing": (
        "story",
        "poem",
        "essay",
        "novel",
        "character",
        "write a",
        "blog",
        "article",
        "script for",
        "song",
        "lyrics",
        "rewrite",
        "paraphrase",
        "summar",
        "tweet",
        "email",
    ),
    "education": (
        "student",
        "teacher",
        "lesson",
        "course",
        "school",
        "university",
        "learn",
        "exam",
        "curriculum",
        "homework",
        "explain",
    ),
    "health": (
        "health",
        "diet",
        "exercise",
        "medical",
        "doctor",
        "symptom",
        "disease",
        "mental",
        "therapy",
        "sleep",
        "fitness",
        "nutrition",
        "patient",
    ),
    "career": (
        "resume",
        "cover letter",
        "interview",
        "job",
        "career",
        "hiring",
        "salary",
        "skills",
    ),
    "legal": (
        "law",
        "legal",
        "contract",
        "policy",
        "court",
        "regulation",
        "rights",
        "gdpr",
        "terms",
    ),
    "lifestyle": (
        "travel",
        "recipe",
        "food",
        "cook",
        "gift",
        "wedding",
        "restaurant",
        "trip",
        "vacation",
        "home",
        "garden",
        "fashion",
        "pet",
        "dog",
        "cat ",
    ),
    "games-roleplay": (
        "game",
        "play",
        "role",
        "pretend",
        "act as",
        "dungeon",
        "character named",
        "rpg",
        "fantasy",
        "simulate",
    ),
    "history-culture": (
        "history",
        "war",
        "religion",
        "philosophy",
        "culture",
        "politic",
        "ancient",
        "bible",
        "god",
        "country",
    ),
}
TOPICS: tuple[str, ...] = (*TOPIC_KEYWORDS, "non-english", "other")
# One dict lookup per word prefix instead of 14 regexes (those took ~3 ms a prompt).
_WORD_KEYS = {
    k.strip(): t for t, kws in TOPIC_KEYWORDS.items() for k in kws if " " not in k.strip()
}
_PHRASES = [(k.strip(), t) for t, kws in TOPIC_KEYWORDS.items() for k in kws if " " in k.strip()]
_WORD = re.compile(r"[a-z][a-z+#]*")


@dataclass(frozen=True)
class Thread:
    """One usable conversation: strictly alternating user/assistant turns starting with a user.

    ``turns[0::2]`` are user texts, ``turns[1::2]`` the assistant's answers (the last user turn
    may have none).
    """

    id: str
    base_id: str
    topic: str
    turns: tuple[str, ...]
    focus: str | None = None  # finer subject inside the topic (focus_of), None when it has none

    @property
    def user_turns(self) -> tuple[str, ...]:
        return self.turns[0::2]

    def answer(self, k: int) -> str | None:
        """The assistant's answer to user turn ``k`` (0-based), if the conversation has it."""
        return self.turns[2 * k + 1] if 2 * k + 1 < len(self.turns) else None


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def pool_of(conversation_id: str) -> PoolName:
    """The pool a ShareGPT conversation id hashes to (before the text rules; deterministic)."""
    base = base_id(conversation_id)
    bucket = int.from_bytes(hashlib.sha256(_SALT + base.encode()).digest()[:8], "big") % 100
    return "calibration" if bucket < _SPLIT[0] else "eval" if bucket < _SPLIT[1] else "attack"


def _keyword_hits(sample: str) -> dict[tuple[str, str], int]:
    """(topic, keyword) -> how many words of ``sample`` (lower case) the keyword starts (phrases: 1)."""
    hits: dict[tuple[str, str], int] = defaultdict(int)
    for word in _WORD.findall(sample):
        for end in range(min(len(word), 12), 1, -1):  # the longest keyword that starts the word
            topic = _WORD_KEYS.get(word[:end])
            # keywords of <= 4 letters match whole words (or plurals) only: "cat" not "category"
            if topic is not None and (end > 4 or len(word) - end <= (word[-1] == "s")):
                hits[topic, word[:end]] += 1
                break
    for phrase, topic in _PHRASES:
        if phrase in sample:
            hits[topic, phrase] += 1
    return hits


def topic_of(text: str) -> str:
    """Coarse topic of a prompt (see the module docstring): the topic whose keywords start the
    most words; "non-english" when under 60% of the characters are ASCII."""
    sample = text[:600].lower()  # the opening says what it is about; 600 keeps this ~0.1 ms
    if not sample or len(sample.encode("ascii", "ignore")) < 0.6 * len(sample):
        return "non-english" if sample else "other"
    hits: dict[str, int] = defaultdict(int)
    for (topic, _), n in _keyword_hits(sample).items():
        hits[topic] += n
    # ties go to the topic listed first (dict order of TOPIC_KEYWORDS), so the result is stable
    return max(TOPIC_KEYWORDS, key=lambda t: hits.get(t, 0)) if hits else "other"


def focus_of(text: str, topic: str) -> str | None:
    """A finer subject inside ``topic``: its keyword that starts the most words of the prompt
    ("python", "sql", "resume", "recipe"); None for "other", "non-english" or no hit. Benign users
    return to a few of these (``arena.benign``): a Python programmer asks about Python all week."""
    if topic not in TOPIC_KEYWORDS:
        return None
    hits = {kw: n for (t, kw), n in _keyword_hits(text[:600].lower()).items() if t == topic}
    return max(sorted(hits), key=lambda kw: hits[kw]) if hits else None


def _clean_turns(turns: tuple[tuple[str, str], ...]) -> tuple[str, ...]:
    """Alternating (user, assistant, ...) texts: leading answers dropped, cut at the first break
    in alternation or empty user turn, each text cut to MAX_MESSAGE_CHARS."""
    i = 0
    while i < len(turns) and turns[i][0] != "user":
        i += 1
    out: list[str] = []
    for role, text in turns[i:]:
        want = "user" if len(out) % 2 == 0 else "assistant"
        if role != want or not text.strip():
            break
        out.append(text[:MAX_MESSAGE_CHARS])
    return tuple(out)


def base_id(conversation_id: str) -> str:
    """``abc`` for a part ``abc_3`` of a long ShareGPT conversation (ShareGPT's ids end in ``_N``)."""
    return conversation_id.rsplit("_", 1)[0]


def _whole_conversations() -> Iterator[tuple[str, tuple[tuple[str, str], ...]]]:
    """(base id, turns) of every ShareGPT conversation with its parts joined in order.

    ShareGPT cuts a long conversation into parts ``abc_0``, ``abc_1``, ... (10.7k of the 17.6k
    objects are such parts, of 2.5k conversations). Replayed one by one, every later part would
    open a *new* conversation with a follow-up question and no history: benign users would look
    like clients that never continue a conversation. Joined, a follow-up carries its history. At
    6.3k of the 8.2k joins a part ends and the next begins with the assistant (the answer spans
    the cut): adjacent turns of one role are joined into one turn.
    """
    parts: dict[str, list[tuple[int, tuple[tuple[str, str], ...]]]] = {}
    for conv in iter_conversations():
        base = base_id(conv.id)
        part = conv.id.rpartition("_")[2]
        index = int(part) if base != conv.id and part.isdigit() else 0
        parts.setdefault(base, []).append(
            (index, conv.turns)
        )  # dict order: file order of first parts
    for base, pieces in parts.items():
        turns: list[tuple[str, str]] = []
        for _, piece in sorted(pieces, key=lambda x: x[0]):
            for role, text in piece:
                if turns and turns[-1][0] == role and turns[-1][1].strip() and text.strip():
                    turns[-1] = (role, turns[-1][1].rstrip() + "\n\n" + text.lstrip())
                else:
                    turns.append((role, text))
        yield base, tuple(turns)


@lru_cache(maxsize=2)
def load_pools(whole: bool = False) -> dict[PoolName, tuple[Thread, ...]]:
    """The three pools, each in file order (deterministic). Cached for the process.

    ``whole``: ShareGPT's parts joined into whole conversations (``_whole_conversations``);
    otherwise each part is a thread of its own (``abc_1`` starts without ``abc_0``'s history), as
    the README's detection numbers were measured: see ``TrafficConfig.whole_conversations``."""
    raw: dict[PoolName, list[Thread]] = defaultdict(list)
    if whole:
        source = ((base, base, turns) for base, turns in _whole_conversations())
    else:
        source = ((conv.id, base_id(conv.id), conv.turns) for conv in iter_conversations())
    for cid, base, turns in source:
        turns = _clean_turns(turns)
        if not turns:
            continue
        opening = turns[0] + " " + (turns[1][:300] if len(turns) > 1 else "")
        topic = topic_of(opening)
        raw[pool_of(base)].append(
            Thread(id=cid, base_id=base, topic=topic, turns=turns, focus=focus_of(opening, topic))
        )
    calibration = tuple(raw["calibration"])
    cal_firsts = {normalise(t.turns[0]) for t in calibration}
    evaluation = tuple(t for t in raw["eval"] if normalise(t.turns[0]) not in cal_firsts)
    benign_texts = {normalise(u) for t in (*calibration, *evaluation) for u in t.user_turns}
    attack = []
    for t in raw["attack"]:
        keep = 0
        for k, u in enumerate(t.user_turns):
            if normalise(u) in benign_texts:
                break
            keep = 2 * k + 2
        if keep:
            attack.append(Thread(t.id, t.base_id, t.topic, t.turns[:keep], t.focus))
    return {"calibration": calibration, "eval": evaluation, "attack": tuple(attack)}


@lru_cache(maxsize=8)
def public_prompts(size: int, whole: bool = False) -> tuple[tuple[str, str | None], ...]:
    """A public prompt set of ``size`` prompts, most popular first: (prompt, its answer) of
    attack-pool first turns of 8-60 words, in file order. Benign users draw on it Zipf-popular
    (``TrafficConfig.popular_prompts``) and the sweeping campaigns cover the same pool, so a sweep
    meets people who typed the same prompts, as a sweep over a public prompt set does."""
    out: list[tuple[str, str | None]] = []
    seen: set[str] = set()
    for t in load_pools(whole)["attack"]:
        text = t.turns[0]
        if 8 <= len(text.split()) <= 60 and normalise(text) not in seen:
            seen.add(normalise(text))
            out.append((text, t.answer(0)))
            if len(out) == size:
                break
    return tuple(out)
