"""Scoring throughput of the online monitor, embeddings included, on 2 cores.

Arena traffic (benign users of the eval pool and every campaign kind, mixed and in time order)
goes through ``AccountMonitor.observe_batch`` in batches of ``--batch`` requests, as the
gateway's background task would feed it. Each configuration gets a fresh monitor and a fresh
embedding cache (every prompt is embedded for the first time, the worst case), run side by side
on the same records:

- ``all``            every detector; the default embedding policy (1 in ``embed_every`` prompts of an
                     account after its first ``window``; follow-up turns not embedded),
- ``all-embed-every`` every detector, every prompt embedded,
- ``no-embeddings``  volume, timing, shape, linking only (the cost of everything but MiniLM).

The target (issue 5) is >= 300 requests/s on 2 cores for ``all``. Prints JSON.

    nice -n 10 .venv/bin/python bench/detect_throughput.py --requests 3000
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace

import torch

from distillguard.arena.traffic import TrafficConfig, generate_traffic
from distillguard.detect import AccountMonitor, DetectConfig, calibrate
from distillguard.detect.embed import Embedder


def run(cal, records, batch: int, embedder) -> dict:
    monitor = AccountMonitor(cal, embedder=embedder)
    t = time.perf_counter()
    embedded = 0
    for i in range(0, len(records), batch):
        before = len(embedder._cache) if embedder is not None else 0
        monitor.observe_batch(records[i:i + batch])
        embedded += (len(embedder._cache) - before) if embedder is not None else 0
    dt = time.perf_counter() - t
    return {"requests": len(records), "seconds": round(dt, 2), "requests_per_s": round(len(records) / dt, 1),
            "prompts_embedded": embedded}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cal_records = generate_traffic(TrafficConfig(benign_accounts=40, pool="calibration", days=1, seed=11))
    traffic = generate_traffic(TrafficConfig(benign_accounts=100, days=1, seed=12, campaigns=(
        "bulk:1:600", "template:1:400", "reasoning:1:400", "logprobs:1:400", "hydra:10:60", "slowlow:1:60")))
    records = traffic[: args.requests]
    out = {"threads": args.threads, "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "configs": {}}
    base = DetectConfig()
    # one calibration with embeddings, reused with the other embedding policy (its numbers do not
    # change the cost), one without
    embedder = Embedder()
    cal_all = calibrate(cal_records, config=base, embedder=embedder)
    cal_none = calibrate(cal_records, config=replace(base, detectors=("volume", "timing", "shape", "linking")))
    configs = {"all": cal_all,
               "all-embed-every": replace(cal_all, config=replace(base, embed_every=1, embed_followups=True)),
               "no-embeddings": cal_none}
    for name, cal in configs.items():
        emb = embedder if cal.reference is not None else None
        embedder._cache.clear()  # every prompt embedded anew: the worst case
        out["configs"][name] = run(cal, records, args.batch, emb)
        print(name, json.dumps(out["configs"][name]), flush=True)
    out["load_avg_1m_after"] = os.getloadavg()[0]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
