"""What each countermeasure costs a benign user who is flagged by mistake, measured on benign traffic.

A false positive is not free: the policy ladder then applies to a real user. This replays the
benign users of ``distillguard arena traffic`` (held-out pool: real ShareGPT conversations with
human timing, heavy users, researchers asking for logprobs) through the gateway's own limiter
and policy code, with a simulated clock, and reports per action:

- ``throttle``: the share of a benign account's requests refused (429) once throttled, for keys
  with no limits (the ladder's throttle_rpm / throttle_tpm apply) and keys with typical limits;
- ``limit_logprobs``: the share of benign requests that asked for logprobs (they lose them);
- ``canary`` / ``block``: the share of answers replaced / refused (canary_rate, 100%);
- ``watermark_boost``: the perplexity cost is measured by ``bench/watermark_quality.py``
  (δ = watermark_boost_delta); quoted there, not recomputed here.

Multiply by the detector's false-positive rate (``bench/detect_eval.py``) for the expected cost
per benign account.

    python bench/policy_impact.py                 # 300 benign accounts, 3 days, ~10 s
    python bench/policy_impact.py --accounts 1000 --days 7

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from collections import defaultdict

from rich.console import Console
from rich.progress import track

from distillguard.arena import TrafficConfig, generate_traffic
from distillguard.guard.limits import Limits, MemoryLimiter, RateLimited
from distillguard.guard.policy import Level, PolicyConfig

console = Console(stderr=True)


class SimClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def tokens_of(record: dict) -> tuple[int, int]:
    usage = (record.get("response") or {}).get("usage") or {}
    prompt = usage.get("prompt_tokens") or 0
    completion = usage.get("completion_tokens") or 0
    return prompt, completion


async def refused_share(records: list[dict], limits: Limits) -> float:
    """Share of one account's requests a limiter with these limits refuses, replayed in time."""
    clock = SimClock()
    limiter = MemoryLimiter(clock=clock)
    refused = 0
    for r in records:
        clock.now = r["ts"]
        prompt, completion = tokens_of(r)
        req = r["request"]
        budget = prompt + (req.get("n") or 1) * (
            req.get("max_tokens") or req.get("max_completion_tokens") or 1024
        )
        budget = min(budget, limits.tpm or budget)  # a request larger than tpm is refused anyway
        try:
            lease = await limiter.acquire("k", limits, budget)
        except RateLimited:
            refused += 1
            continue
        await limiter.release(lease, prompt + completion)  # settled at once (latency ignored)
    return refused / max(1, len(records))


def summary(values: list[float]) -> dict:
    values = sorted(values)
    return {
        "mean": round(statistics.fmean(values), 4),
        "median": round(values[len(values) // 2], 4),
        "p95": round(values[int(0.95 * (len(values) - 1))], 4),
        "max": round(values[-1], 4),
        "accounts_with_any": round(sum(v > 0 for v in values) / len(values), 4),
    }


async def main_async(args: argparse.Namespace) -> dict:
    policy = PolicyConfig(
        **({"throttle_tpm": args.throttle_tpm} if args.throttle_tpm else {}),
        **({"throttle_rpm": args.throttle_rpm} if args.throttle_rpm else {}),
    )
    decision = policy.decide(Level.SUSPECT)
    records = generate_traffic(
        TrafficConfig(benign_accounts=args.accounts, days=args.days, seed=args.seed, pool="eval")
    )
    by_account: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_account[r["account"]].append(r)
    typical = Limits(rpm=args.rpm, tpm=args.tpm)
    throttled_none, throttled_typical, unthrottled_typical = [], [], []
    for account in track(
        sorted(by_account), description="replaying benign accounts", console=console
    ):
        rs = sorted(by_account[account], key=lambda r: r["ts"])
        throttled_none.append(await refused_share(rs, decision.limits(Limits())))
        throttled_typical.append(await refused_share(rs, decision.limits(typical)))
        unthrottled_typical.append(await refused_share(rs, typical))
    asked_logprobs = sum(bool(r["request"].get("logprobs")) for r in records) / len(records)
    per_day = len(records) / len(by_account) / args.days
    return {
        "bench": "policy_impact",
        "benign_accounts": len(by_account),
        "benign_requests": len(records),
        "requests_per_account_day": round(per_day, 2),
        "days": args.days,
        "policy": policy.model_dump(
            include={
                "throttle_factor",
                "throttle_rpm",
                "throttle_tpm",
                "logprobs_cap",
                "canary_rate",
                "watermark_boost_delta",
            }
        ),
        "throttle": {
            "refused_share_keys_without_limits": summary(throttled_none),
            f"refused_share_keys_rpm{args.rpm}_tpm{args.tpm}": summary(throttled_typical),
            f"refused_share_unthrottled_rpm{args.rpm}_tpm{args.tpm}": summary(unthrottled_typical),
        },
        "limit_logprobs": {"benign_requests_that_asked_for_logprobs": round(asked_logprobs, 4)},
        "canary": {"answers_replaced_share": policy.canary_rate},
        "block": {"requests_refused_share": 1.0},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--accounts", type=int, default=300)
    ap.add_argument("--days", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--rpm", type=int, default=60, help="typical key limit for the comparison")
    ap.add_argument("--tpm", type=int, default=40_000, help="typical key limit for the comparison")
    ap.add_argument(
        "--throttle-rpm", type=int, default=0, help="override the ladder's throttle_rpm"
    )
    ap.add_argument(
        "--throttle-tpm", type=int, default=0, help="override the ladder's throttle_tpm"
    )
    args = ap.parse_args()
    print(json.dumps(asyncio.run(main_async(args)), indent=2))


if __name__ == "__main__":
    main()
