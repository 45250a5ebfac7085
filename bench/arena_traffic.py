"""Speed of ``distillguard arena traffic``: the one-time pool read, then generation and JSON
encoding per request, side by side (CPU seconds of this process, so other load on the machine
does not count).

    python bench/arena_traffic.py
    python bench/arena_traffic.py --benign 500 --campaigns bulk template hydra:40 --repeat 3

Prints one JSON object to stdout.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time

ALL = ["bulk", "template", "reasoning", "logprobs", "hydra", "slowlow"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--benign", type=int, default=300, help="benign accounts")
    ap.add_argument("--campaigns", nargs="*", default=ALL, help="KIND[:ACCOUNTS[:REQUESTS]] ...")
    ap.add_argument("--days", type=float, default=3.0)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs (the best is reported)")
    args = ap.parse_args()

    t0 = time.process_time()
    from distillguard.arena import TrafficConfig, generate_traffic, load_pools
    from distillguard.arena.campaigns import _seed_prompts

    pools = load_pools()
    _seed_prompts(pools["attack"])
    load_s = time.process_time() - t0

    config = TrafficConfig(
        benign_accounts=args.benign, campaigns=args.campaigns, days=args.days, seed=1
    )
    best_gen = best_enc = float("inf")
    n = size = 0
    for _ in range(args.repeat):
        t = time.process_time()
        records = generate_traffic(config)
        best_gen = min(best_gen, time.process_time() - t)
        t = time.process_time()
        buf = io.StringIO()
        for r in records:
            buf.write(json.dumps(r, ensure_ascii=False) + "\n")
        best_enc = min(best_enc, time.process_time() - t)
        n, size = len(records), len(buf.getvalue().encode())
    print(
        json.dumps(
            {
                "requests": n,
                "benign_accounts": args.benign,
                "campaigns": args.campaigns,
                "days": args.days,
                "pool_load_cpu_s": round(load_s, 2),
                "generate_cpu_s": round(best_gen, 3),
                "generate_req_per_s": round(n / best_gen),
                "json_cpu_s": round(best_enc, 3),
                "json_req_per_s": round(n / best_enc),
                "end_to_end_req_per_s": round(n / (best_gen + best_enc)),
                "mb_per_1000_requests": round(size / n / 1000, 2),
                "machine": {
                    "python": platform.python_version(),
                    "cpus": os.cpu_count(),
                    "load_avg_1m": round(os.getloadavg()[0], 2),
                },
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
