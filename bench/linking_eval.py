"""Linking on traffic where people share prompts and networks (issue 23): benign users that open
some of their conversations with Zipf-popular prompts of a public set (which the sweeping
campaigns send too), app users sharing an app's system prompt and users behind large NATs, against two hydra campaigns, a logprob sweep, a bulk
harvester and a low-and-slow account. Calibrated on the calibration pool with the same benign
kinds (other seed), scored with the detectors that need no embeddings (the linking question does
not depend on MiniLM, and this runs in about a minute on 2 cores).

Per label: accounts, flagged, in a cluster; the benign accounts flagged, with their clusters; the
attack accounts missed. Prints JSON and writes it to ``--out``.

    nice .venv/bin/python bench/linking_eval.py --out bench/results/linking_eval.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _population import add_population_args, population_kinds

from distillguard.arena import TrafficConfig, generate_traffic
from distillguard.detect import DetectConfig, calibrate, detect

DETECTORS = ("volume", "timing", "shape", "template", "cot", "fresh", "linking")
CAMPAIGNS = ("hydra:20:60", "hydra:8:60", "logprobs:1:1500", "bulk:1:400", "slowlow:1:90")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calibration-accounts", type=int, default=400)
    ap.add_argument("--benign-accounts", type=int, default=400)
    add_population_args(ap)
    ap.add_argument("--seed", type=int, default=51)
    ap.add_argument("--target-fpr", type=float, default=0.001)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    kinds = population_kinds(args)
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
    records = generate_traffic(
        TrafficConfig(
            benign_accounts=args.benign_accounts, seed=args.seed + 1, campaigns=CAMPAIGNS, **kinds
        )
    )
    report = detect(records, cal)
    labels: dict[str, dict] = {}
    for r in report["results"]:
        row = labels.setdefault(r.label, {"accounts": 0, "flagged": 0, "clustered": 0})
        row["accounts"] += 1
        row["flagged"] += r.flagged
        row["clustered"] += r.cluster is not None
    out = {
        "config": vars(args)
        | {
            "out": str(args.out) if args.out else None,
            "campaigns": CAMPAIGNS,
            "detectors": DETECTORS,
        },
        "threshold": cal.threshold,
        "labels": labels,
        "benign_flagged": [
            {
                "account": r.account,
                "cluster": r.cluster,
                "score": round(r.score, 1),
                "reasons": r.reasons,
            }
            for r in report["results"]
            if r.label == "benign" and r.flagged
        ],
        "attack_missed": [
            {
                "account": r.account,
                "label": r.label,
                "cluster": r.cluster,
                "requests": r.requests,
                "score": round(r.score, 1),
            }
            for r in report["results"]
            if r.label != "benign" and not r.flagged
        ],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    text = json.dumps(out, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
