"""What ``--ledger-content hashes`` and ``off`` cost offline detection, on arena traffic.

The same evaluation traffic (benign users from the eval pool + one kind of campaign at a time) is
scored three ways:

- ``full``: prompts as text, calibrated on text (the default ledger);
- ``hashes, text calibration``: the ledger kept hashes, the calibration was made on text;
- ``hashes`` / ``off``: both the calibration and the scored traffic kept as the ledger would
  (``guard.privacy.private_value``), which is what a provider running that mode has.

Per kind: the share of attacker accounts flagged, benign accounts flagged, and ROC AUC. Small by
default (150 calibration accounts, 100 benign, 2 days, 3 attackers of 300 requests per kind, 1
hydra of 20 accounts): enough to see which detectors carry a kind, not to check a 0.001 FPR.

    python bench/ledger_privacy.py          # writes bench/results/ledger_privacy.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from _provenance import code_version  # noqa: E402 - bench/ is on sys.path
from sklearn.metrics import roc_auc_score

from distillguard.arena.traffic import TrafficConfig, generate_traffic
from distillguard.detect import DetectConfig, calibrate, detect
from distillguard.detect.embed import shared_embedder
from distillguard.guard.privacy import private_value

RESULTS = Path(__file__).with_name("results")
KINDS = ("bulk", "template", "reasoning", "logprobs", "slowlow", "hydra")


def stored(records: list[dict], mode: str) -> list[dict]:
    """``records`` as a ledger in ``mode`` keeps them (request bodies; responses carry no text here)."""
    if mode == "full":
        return records
    return [{**r, "request": private_value(r["request"], mode)} for r in records]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cal-accounts", type=int, default=150)
    ap.add_argument("--eval-accounts", type=int, default=100)
    ap.add_argument("--days", type=float, default=2.0)
    ap.add_argument("--attackers", type=int, default=3)
    ap.add_argument("--campaign-requests", type=int, default=300)
    ap.add_argument("--target-fpr", type=float, default=0.001)
    ap.add_argument("--out", default=str(RESULTS / "ledger_privacy.json"))
    args = ap.parse_args()
    embedder = shared_embedder()
    cal_records = generate_traffic(
        TrafficConfig(
            benign_accounts=args.cal_accounts, pool="calibration", days=args.days, seed=101
        )
    )
    config = DetectConfig(target_fpr=args.target_fpr)
    cals = {}
    for mode in ("full", "hashes", "off"):
        t0 = time.time()
        cals[mode] = calibrate(stored(cal_records, mode), config=config, embedder=embedder)
        print(
            f"calibrated on {mode} in {time.time() - t0:.0f} s: threshold {cals[mode].threshold:.1f}",
            flush=True,
        )
    settings = {
        "full": ("full", "full"),
        "hashes, text calibration": ("full", "hashes"),
        "hashes": ("hashes", "hashes"),
        "off": ("off", "off"),
    }
    benign = generate_traffic(
        TrafficConfig(benign_accounts=args.eval_accounts, pool="eval", days=args.days, seed=202)
    )
    benign_accounts = sorted({r["account"] for r in benign})
    out: dict = {
        "code": code_version(),
        "sizes": vars(args) | {"kinds": KINDS},
        "thresholds": {m: cals[m].threshold for m in cals},
        "kinds": {},
    }
    for n, kind in enumerate(KINDS):
        spec = (
            f"{kind}:1:{args.campaign_requests}"
            if kind not in ("hydra", "slowlow")
            else f"{kind}:1"
        )
        specs = ("hydra",) if kind == "hydra" else (spec,) * args.attackers
        camp = generate_traffic(
            TrafficConfig(benign_accounts=0, campaigns=specs, days=args.days, seed=300 + n)
        )
        attack = sorted({r["account"] for r in camp})
        for name, (cal_mode, mode) in settings.items():
            rows = {
                r.account: r
                for r in detect(stored(benign + camp, mode), cals[cal_mode], embedder=embedder)[
                    "results"
                ]
            }
            y = np.r_[np.zeros(len(benign_accounts)), np.ones(len(attack))]
            s = np.r_[[rows[a].score for a in benign_accounts], [rows[a].score for a in attack]]
            res = {
                "attackers": len(attack),
                "attackers_flagged": sum(rows[a].flagged for a in attack),
                "benign": len(benign_accounts),
                "benign_flagged": sum(rows[a].flagged for a in benign_accounts),
                "auc": round(float(roc_auc_score(y, s)), 4),
            }
            out["kinds"].setdefault(kind, {})[name] = res
            print(kind, name, res, flush=True)
    RESULTS.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
