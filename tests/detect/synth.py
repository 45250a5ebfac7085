"""Small synthetic traffic with known truth, for fast tests (the arena makes the realistic kind)."""

from __future__ import annotations

import random

T0 = 1_793_577_600.0  # 2026-11-02 00:00 UTC
WORDS = (
    "garden",
    "python",
    "tax",
    "recipe",
    "guitar",
    "visa",
    "marathon",
    "poetry",
    "router",
    "budget",
    "chemistry",
    "resume",
    "vacation",
    "piano",
    "startup",
    "physics",
    "knitting",
    "diet",
    "chess",
    "history",
)


def record(
    account: str, ts: float, prompt: str, *, history: int = 0, ip: str | None = None, **params
) -> dict:
    messages = []
    for k in range(history):
        messages += [
            {"role": "user", "content": f"earlier question {k}"},
            {"role": "assistant", "content": "answer"},
        ]
    messages.append({"role": "user", "content": prompt})
    if "system" in params:
        messages.insert(0, {"role": "system", "content": params.pop("system")})
    return {
        "ts": ts,
        "account": account,
        "ip": ip,
        "request": {"model": "m", "messages": messages, **params},
        "response": {"usage": {"prompt_tokens": 20, "completion_tokens": 200}},
    }


def benign_account(
    rng: random.Random, name: str, *, days: int = 1, start: float = T0
) -> list[dict]:
    """A person: a few sessions a day, follow-up turns, bursty gaps, two favourite topics."""
    topics = rng.sample(WORDS, 2)
    out = []
    for d in range(days):
        t = start + d * 86400 + rng.uniform(8, 20) * 3600
        for _ in range(rng.randint(1, 3)):
            turns = rng.randint(1, 6)
            for k in range(turns):
                out.append(
                    record(
                        name,
                        t,
                        f"tell me more about my {rng.choice(topics)} question {rng.randint(0, 99)}",
                        history=k,
                        ip=f"10.{rng.randrange(256)}.{rng.randrange(256)}.7",
                        max_tokens=rng.choice((None, 512, 1024)),
                    )
                )
                t += rng.lognormvariate(4.0, 1.2)
            t += rng.uniform(1800, 7200)
    return out


def bulk_account(
    rng: random.Random, name: str, n: int, *, start: float = T0 + 3600, gap: float = 1.5
) -> list[dict]:
    """A script: single-turn prompts over every topic, long answers, logprobs, steady rate."""
    out, t = [], start
    for i in range(n):
        out.append(
            record(
                name,
                t,
                f"Explain {WORDS[i % len(WORDS)]} number {i} step by step.",
                ip="45.83.17.9",
                max_tokens=4096,
                logprobs=True,
                top_logprobs=20,
            )
        )
        t += gap * rng.uniform(0.9, 1.1)
    return out
