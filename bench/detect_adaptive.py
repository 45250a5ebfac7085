"""Attackers who adapt (issue 23): TPR of the ``adaptive`` campaign (arena/adaptive.py) against
the accounts it spreads over and the requests each account sends, honestly, including where
detection stops working.

One calibration (``--calibration-accounts`` benign users of the calibration pool, seed S, the
detectors of detect_fpr.py), then one traffic per cell: ``--benign-accounts`` users of the eval
pool (seed S + 1000, the kinds of detect_fpr.py) and one adaptive campaign of A accounts x V
requests over the window. Per cell: campaign accounts flagged (TPR with its one-sided 95%
Clopper-Pearson interval), median requests to the first flag, benign accounts flagged in the
same run, and how many of the campaign's requests repeat a conversation another of its accounts
sent (the pool runs out at ~11.5k user turns; repeats are what linking can see).

    nice -n 10 .venv/bin/python bench/detect_adaptive.py --out bench/results/detect_adaptive.json

writes the JSON and a PNG next to it (TPR against accounts, one line per volume).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

from _provenance import code_version
from detect_fpr import DETECTORS, cp_lower

import distillguard.arena.adaptive  # noqa: F401 - registers the kind where entry points are stale
from distillguard.arena import TrafficConfig, generate_traffic
from distillguard.detect import DetectConfig, calibrate
from distillguard.detect.calibrate import cp_upper, replay_flags
from distillguard.detect.features import extract


def repeats(records: list[dict]) -> int:
    """Campaign requests whose newest user turn another account of the campaign also sent."""
    senders: dict[str, set[str]] = defaultdict(set)
    for r in records:
        last = [m for m in r["request"]["messages"] if m["role"] == "user"][-1]["content"]
        senders[last].add(r["account"])
        r["_last"] = last
    return sum(len(senders[r.pop("_last")]) > 1 for r in records)


def cell(cal, args, kinds: dict, accounts: int, volume: int) -> dict:
    t0 = time.perf_counter()
    records = generate_traffic(
        TrafficConfig(
            benign_accounts=args.benign_accounts,
            seed=args.seed + 1000,
            pool="eval",
            campaigns=(f"adaptive:{accounts}:{volume}",),
            **kinds,
        )
    )
    label = {r["account"]: r["label"] for r in records}
    attack = [r for r in records if r["label"] == "adaptive"]
    flags = replay_flags(cal, sorted((extract(r) for r in records), key=lambda f: f.ts))
    camp = [a for a, lab in label.items() if lab == "adaptive"]
    hit = [a for a in camp if a in flags.first_flag]
    benign = [a for a, lab in label.items() if lab == "benign"]
    fb = sum(a in flags.first_flag for a in benign)
    sent = [flags.requests[a] for a in camp]
    return {
        "accounts": accounts,
        "requests_per_account": volume,
        "requests_sent_median": statistics.median(sent),
        "requests_per_account_day": volume / args.days,
        "flagged": len(hit),
        "tpr": len(hit) / len(camp),
        "tpr_cp95": [cp_lower(len(hit), len(camp)), cp_upper(len(hit), len(camp))],
        "median_requests_to_flag": statistics.median(flags.first_flag[a] for a in hit)
        if hit
        else None,
        "campaign_requests": len(attack),
        "repeated_requests": repeats(attack),
        "benign_flagged": fb,
        "benign_accounts": len(benign),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    by_volume: dict[int, list[dict]] = defaultdict(list)
    for c in out["cells"]:
        by_volume[c["requests_per_account"]].append(c)
    for v, cells in sorted(by_volume.items()):
        cells.sort(key=lambda c: c["accounts"])
        xs = [c["accounts"] for c in cells]
        ax.plot(xs, [c["tpr"] for c in cells], "o-", label=f"{v} requests/account")
        ax.fill_between(
            xs, [c["tpr_cp95"][0] for c in cells], [c["tpr_cp95"][1] for c in cells], alpha=0.15
        )
    fpr = out["calibration"].get("heldout_account_fpr")
    if fpr is not None:
        ax.axhline(fpr, color="grey", lw=0.8, ls="--", label="held-out benign FPR per account")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("accounts in the campaign")
    ax.set_ylabel("campaign accounts flagged (TPR)")
    ax.set_title(f"adaptive campaign over {out['config']['days']:g} days (95% CP bands)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--calibration-accounts", type=int, default=2000)
    ap.add_argument("--benign-accounts", type=int, default=500)
    ap.add_argument("--accounts", type=int, nargs="+", default=[10, 25, 50, 100, 200])
    ap.add_argument("--volumes", type=int, nargs="+", default=[20, 60, 180])
    ap.add_argument(
        "--max-campaign-requests",
        type=int,
        default=20_000,
        help="skip cells above this many campaign requests (CPU on the shared machine)",
    )
    ap.add_argument("--days", type=float, default=2.0)
    ap.add_argument("--target-fpr", type=float, default=0.001)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    kinds = dict(
        popular_prompts=300,
        popular_share=0.3,
        app_share=0.05,
        apps=5,
        nat_share=0.2,
        nat_size=100,
        days=args.days,
    )
    t0 = time.perf_counter()
    cal = calibrate(
        generate_traffic(
            TrafficConfig(
                benign_accounts=args.calibration_accounts,
                seed=args.seed,
                pool="calibration",
                **kinds,
            )
        ),
        config=DetectConfig(target_fpr=args.target_fpr, detectors=DETECTORS),
    )
    print(f"calibrated: threshold {cal.threshold:.1f} ({time.perf_counter() - t0:.0f} s)")
    cells, skipped = [], []
    for v in args.volumes:
        for a in args.accounts:
            if a * v > args.max_campaign_requests:
                skipped.append({"accounts": a, "requests_per_account": v})
                continue
            cells.append(cell(cal, args, kinds, a, v))
            c = cells[-1]
            print(
                f"{a} accounts x {v}: {c['flagged']}/{a} flagged, benign {c['benign_flagged']}/"
                f"{c['benign_accounts']}, repeats {c['repeated_requests']} ({c['seconds']} s)",
                flush=True,
            )
    out = {
        "code_version": code_version(),
        "command": "nice -n 10 python "
        + " ".join(["bench/" + Path(sys.argv[0]).name, *sys.argv[1:]]),
        "config": vars(args)
        | {"out": str(args.out) if args.out else None, "detectors": DETECTORS, "kinds": kinds},
        "threshold": cal.threshold,
        "calibration": cal.stats,
        "cells": cells,
        "skipped": skipped,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if args.out is not None:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
        plot(out, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
