"""Scoring throughput of the online monitor, embeddings included, on 2 cores.

Arena traffic (benign users of the eval pool and every campaign kind, mixed and in time order)
goes through ``AccountMonitor.observe_batch`` in batches of ``--batch`` requests, as the
gateway's background task would feed it. Each configuration gets a fresh monitor and a fresh
embedding cache (every prompt is embedded for the first time, the worst case), run side by side
on the same records:

- ``all``            every detector; the default embedding budget (DetectConfig: prompts of an
                     account deferred until it has sent ``embed_after``, then every prompt until its
                     window is full, then 1 in ``embed_every``, 1 in ``embed_every_flagged`` once
                     flagged; follow-up turns not embedded),
- ``all-eager``      every detector, the previous budget (no deferral, 1 in 4 after the window, flagged
                     accounts too),
- ``no-embeddings``  volume, timing, shape, linking only (the cost of everything but MiniLM),
- ``all-N-workers``  ``all`` with MiniLM's forward pass split across ``--embed-workers`` threads
                     (``Embedder(workers=N)``; each slice on one torch thread, on its own core).

Each reports wall and CPU seconds (the process's, all threads), their ratio (``cores_used``:
how much of a second core the scorer kept busy), requests/s, the ratio to
``no-embeddings`` in the same run, and the 1-minute load average before and after (the machine
is shared). The target (issue 5) is >= 300 requests/s on 2 cores for ``all``. Prints JSON.

    nice -n 10 .venv/bin/python bench/detect_throughput.py --requests 3000
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from distillguard.arena.traffic import TrafficConfig, generate_traffic
from distillguard.detect import AccountMonitor, DetectConfig, calibrate
from distillguard.detect.embed import Embedder


def run(cal, records, batch: int, embedder) -> dict:
    monitor = AccountMonitor(cal, embedder=embedder)
    load = os.getloadavg()[0]
    t, cpu = time.perf_counter(), time.process_time()
    embedded = 0
    for i in range(0, len(records), batch):
        before = len(embedder._cache) if embedder is not None else 0
        monitor.observe_batch(records[i : i + batch])
        embedded += (len(embedder._cache) - before) if embedder is not None else 0
    dt, dcpu = time.perf_counter() - t, time.process_time() - cpu
    return {
        "requests": len(records),
        "seconds": round(dt, 2),
        "cpu_seconds": round(dcpu, 2),
        "requests_per_s": round(len(records) / dt, 1),
        "requests_per_cpu_s": round(len(records) / dcpu, 1),
        "prompts_embedded": embedded,
        "load_avg_1m": [round(load, 2), round(os.getloadavg()[0], 2)],
        # > 1: the scorer kept more than one core busy (torch's intra-op threads in MiniLM)
        "cores_used": round(dcpu / dt, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--benign-accounts",
        type=int,
        default=100,
        help="benign users in the day of traffic (100: attack-heavy, the campaigns send ~90%% of the first 1,500 requests)",
    )
    ap.add_argument(
        "--embed-workers",
        type=int,
        default=2,
        help="also run 'all' with MiniLM's forward split across this many threads (1: skip)",
    )
    ap.add_argument(
        "--out",
        default=None,
        help="also write the JSON here (e.g. bench/results/detect_throughput.json)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cal_records = generate_traffic(
        TrafficConfig(benign_accounts=40, pool="calibration", days=1, seed=11)
    )
    traffic = generate_traffic(
        TrafficConfig(
            benign_accounts=args.benign_accounts,
            days=1,
            seed=12,
            campaigns=(
                "bulk:1:600",
                "template:1:400",
                "reasoning:1:400",
                "logprobs:1:400",
                "hydra:10:60",
                "slowlow:1:60",
            ),
        )
    )
    records = traffic[: args.requests]
    out = {
        "threads": args.threads,
        "embed_workers": args.embed_workers,
        "benign_accounts": args.benign_accounts,
        "share_of_requests_from_campaigns": round(
            sum(r["label"] != "benign" for r in records) / len(records), 3
        ),
        "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "configs": {},
    }
    base = DetectConfig()
    # one calibration with embeddings, reused with the other embedding policy (its numbers do not
    # change the cost), one without
    embedder = Embedder()
    cal_all = calibrate(cal_records, config=base, embedder=embedder)
    cal_none = calibrate(
        cal_records, config=replace(base, detectors=("volume", "timing", "shape", "linking"))
    )
    configs = {
        "all": cal_all,
        "all-eager": replace(
            cal_all, config=replace(base, embed_after=1, embed_every=4, embed_every_flagged=4)
        ),
        "no-embeddings": cal_none,
    }
    embedders = {}
    if args.embed_workers > 1:  # the same scorer, MiniLM's forward split across threads
        configs[f"all-{args.embed_workers}-workers"] = cal_all
        embedders[f"all-{args.embed_workers}-workers"] = Embedder(workers=args.embed_workers)
    for name, cal in configs.items():
        emb = embedders.get(name, embedder) if cal.reference is not None else None
        if emb is not None:
            emb._cache.clear()  # every prompt embedded anew: the worst case
        out["configs"][name] = run(cal, records, args.batch, emb)
        print(name, json.dumps(out["configs"][name]), flush=True)
    out["load_avg_1m_after"] = os.getloadavg()[0]
    ref = out["configs"]["no-embeddings"]
    for _name, r in out["configs"].items():
        r["throughput_vs_no_embeddings"] = round(r["requests_per_s"] / ref["requests_per_s"], 3)
        r["cpu_vs_no_embeddings"] = round(r["cpu_seconds"] / ref["cpu_seconds"], 3)
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
