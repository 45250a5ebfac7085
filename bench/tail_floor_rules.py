"""The tail-floor rules side by side on bench/detect_scale.py's population (issue 23): one
calibration population and one scored population per size, calibrated and scored under each rule,
so only the floor differs.

- ``old``: the floor at 90% of the Fisher null (before 54e98ad);
- ``null``: the room for the other detectors left below the Fisher null (``tail_floor``, 54e98ad);
- ``threshold``: that room left below the calibrated threshold (``threshold_floor``, the default).

Why this population: its benign kinds (apps, NATs, heavy users, popular prompts) put the
calibrated threshold far above the Fisher null (~65 against 36.1), where the rules differ; on the
arena's populations the threshold sits at the null and ``null`` and ``threshold`` coincide
(bench/detect_fpr.py --floor-from). The population is our own generator's, so the flags are a
comparison between the rules, not an evaluation.

    nice -n 19 .venv/bin/python bench/tail_floor_rules.py --sizes 100000 1000000 \
        --out bench/results/tail_floor_rules.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

from _provenance import code_version
from detect_scale import DETECTORS, Population, load
from scipy import stats

from distillguard.detect import DetectConfig, detect

calibrate_module = importlib.import_module("distillguard.detect.calibrate")
RULES = ("old", "null", "threshold")


def old_floor(target: float, detectors: int) -> float:
    return math.exp(-0.45 * float(stats.chi2.isf(target, 2 * detectors)))


def one_rule(rule: str, cal_records: list[dict], records: list[dict]) -> dict:
    t = time.perf_counter()
    null_floor = calibrate_module.tail_floor
    if rule == "old":  # the rule before 54e98ad, a null floor of its own
        calibrate_module.tail_floor = old_floor
    try:
        cal = calibrate_module.calibrate(
            cal_records,
            config=DetectConfig(detectors=DETECTORS),
            floor_from="threshold" if rule == "threshold" else "null",
        )
    finally:
        calibrate_module.tail_floor = null_floor
    results = detect(records, cal)["results"]
    accounts, flagged = Counter(), Counter()
    for r in results:
        accounts[r.label] += 1
        flagged[r.label] += bool(r.flagged)
    return {
        "threshold": round(cal.threshold, 2),
        "threshold_fisher_null": round(cal.stats["threshold_fisher_null"], 2),
        "floor_minus_2_ln": round(-2 * math.log(cal.floor), 2),
        "flagged": {k: flagged[k] for k in sorted(accounts)},
        "accounts": {k: accounts[k] for k in sorted(accounts)},
        "benign_account_rate": flagged["benign"] / max(accounts["benign"], 1),
        "seconds": round(time.perf_counter() - t, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    ap.add_argument("--calibration-requests", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = {
        "bench": "tail_floor_rules",
        "command": "python bench/tail_floor_rules.py " + " ".join(sys.argv[1:]),
        "code_version": code_version(),
        "detectors": DETECTORS,
        "note": "detect_scale.py's generator (ours): a comparison of the rules, not an evaluation",
        "sizes": {},
    }
    # the calibration population as detect_scale.py's (seed + 1, no campaigns)
    cal_records = Population(args.calibration_requests, args.seed + 1, campaigns=False).records()
    for n in args.sizes:
        records = Population(n, args.seed, True).records()
        row = out["sizes"][str(n)] = {"requests": len(records), "load_avg_1m_before": load()}
        for rule in args.rules:
            row[rule] = one_rule(rule, cal_records, records)
            print(n, rule, json.dumps(row[rule]), flush=True)
        row["load_avg_1m_after"] = load()
    if args.out is not None:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
