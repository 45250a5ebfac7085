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

``--compare REF`` (repeatable) measures ``no-embeddings`` side by side against the code of git
commit REF instead: the same records (pickled once, from this tree's arena) are scored by a child
process on this tree's ``src/`` and by one on a git worktree of REF, alternating for ``--rounds``
rounds so that the machine's load falls on both alike; each child calibrates with its own code
(not timed) and scores the records twice with fresh monitors: the first run pays one-time costs
(``cold_requests_per_cpu_s``), the second is the steady state compared. Reports requests per
CPU-second per round, the medians and their ratios:

    nice -n 10 .venv/bin/python bench/detect_throughput.py --compare 8b8a416 --compare HEAD \
        --rounds 5 --out bench/results/detect_throughput_linking.json
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from _provenance import code_version

NO_EMBEDDINGS = ("volume", "timing", "shape", "linking")
ROOT = Path(__file__).resolve().parent.parent


def run(cal, records, batch: int, embedder) -> dict:
    from distillguard.detect import AccountMonitor

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


def traffic(requests: int, benign_accounts: int) -> tuple[list[dict], list[dict]]:
    """(calibration records, records to score): one day of arena traffic, every campaign kind."""
    from distillguard.arena.traffic import TrafficConfig, generate_traffic

    cal_records = generate_traffic(
        TrafficConfig(benign_accounts=40, pool="calibration", days=1, seed=11)
    )
    records = generate_traffic(
        TrafficConfig(
            benign_accounts=benign_accounts,
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
    return cal_records, records[:requests]


def worker(path: str, batch: int) -> None:
    """Child of --compare: calibrate and score the pickled records with whatever ``distillguard``
    is importable (PYTHONPATH picks the tree), print one JSON line."""
    import distillguard
    from distillguard.detect import DetectConfig, calibrate

    with open(path, "rb") as fh:
        cal_records, records = pickle.load(fh)
    cal = calibrate(cal_records, config=DetectConfig(detectors=NO_EMBEDDINGS))
    # twice, each on a fresh monitor: the first run pays one-time costs (lazy imports such as
    # igraph/leidenalg, first calls), the second is what a long-running monitor spends per request
    cold = run(cal, records, batch, None)
    out = run(cal, records, batch, None)
    out["cold_requests_per_cpu_s"] = cold["requests_per_cpu_s"]
    out["src"] = str(Path(distillguard.__file__).parent)
    print(json.dumps(out), flush=True)


def compare(args) -> None:
    cal_records, records = traffic(args.requests, args.benign_accounts)
    tmp = Path(tempfile.mkdtemp(prefix="detect_throughput_"))
    data = tmp / "records.pkl"
    data.write_bytes(pickle.dumps((cal_records, records)))
    trees = {"this tree": ROOT}
    commits = {"this tree": code_version()}
    for ref in args.compare:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", ref], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        if not sha:
            raise SystemExit(f"--compare {ref}: not a commit of this repository")
        trees[ref] = tmp / f"wt-{sha}"
        commits[ref] = sha
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(trees[ref]), sha],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
    out = {
        "code_version": code_version(),
        "commits": commits,
        "config": "no-embeddings: " + ",".join(NO_EMBEDDINGS),
        "requests": len(records),
        "benign_accounts": args.benign_accounts,
        "batch": args.batch,
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "load_avg_1m_before": round(os.getloadavg()[0], 2),
        "runs": {name: [] for name in trees},
    }
    try:
        for i in range(args.rounds):
            # alternate the order each round: neither side always runs first
            names = list(trees) if i % 2 == 0 else list(trees)[::-1]
            for name in names:
                env = {**os.environ, "PYTHONPATH": str(trees[name] / "src")}
                cmd = [sys.executable, __file__, "--worker", str(data), "--batch", str(args.batch)]
                res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                r = json.loads(res.stdout.strip().splitlines()[-1])
                out["runs"][name].append(r)
                print(name, json.dumps(r), flush=True)
    finally:
        for ref in args.compare:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(trees[ref])],
                cwd=ROOT,
                capture_output=True,
            )
    out["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    med = {
        name: statistics.median(r["requests_per_cpu_s"] for r in runs)
        for name, runs in out["runs"].items()
    }
    out["median_requests_per_cpu_s"] = med
    out["this_tree_vs"] = {ref: round(med["this tree"] / med[ref], 3) for ref in args.compare}
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


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
    ap.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="REF",
        help="measure no-embeddings side by side against git commit REF (repeatable)",
    )
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of --compare")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.batch)
    if args.compare:
        return compare(args)
    import torch

    from distillguard.detect import DetectConfig, calibrate
    from distillguard.detect.embed import Embedder

    torch.set_num_threads(args.threads)
    cal_records, records = traffic(args.requests, args.benign_accounts)
    out = {
        "code_version": code_version(),
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
    cal_none = calibrate(cal_records, config=base.replace(detectors=NO_EMBEDDINGS))
    configs = {
        "all": cal_all,
        "all-eager": replace(
            cal_all, config=base.replace(embed_after=1, embed_every=4, embed_every_flagged=4)
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
