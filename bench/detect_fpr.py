"""False positives per benign account, with honest bounds, and every campaign kind's TPR (issue 23).

Per seed: calibrate on ``--calibration-accounts`` benign users of the *calibration* pool drawn
with generator seed S, then score ``--benign-accounts`` users of the disjoint *eval* pool drawn
with seed S + 1000 (other conversations, other profiles, other names), mixed with campaigns of
every non-adaptive kind the arena has. Both populations carry the kinds that broke linking
before: Zipf-popular public prompts (which the sweeping campaigns also send), apps sharing a
system prompt, users behind large NATs (one /24), heavy users (the arena's 5%).

Counted the two ways the issue asks:
- per benign account: flagged at any request on any day counts once;
- per benign account-day.
Each with its one-sided 95% Clopper-Pearson upper bound (``calibrate.cp_upper``), per seed and
pooled over the seeds. Per campaign kind: accounts flagged (TPR, one-sided 95% CP lower bound),
median requests to the first flag, and the same without linking evidence ("solo"). Each benign
account flagged is listed with its benign kind and reasons, so a miss can be traced to a detector
and a kind. Detectors: the set without embeddings (``linking_eval.py``'s; MiniLM over 2 x 2,000
users x 3 seeds does not fit the shared 2-core machine).

Decide changes on ``--seeds 7`` (the development seed); report on the others:

    nice -n 10 .venv/bin/python bench/detect_fpr.py --seeds 11 23 37 --out bench/results/detect_fpr.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import statistics
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from _population import add_population_args, population_kinds
from _provenance import code_version
from scipy import stats

from distillguard.arena import TrafficConfig, generate_traffic
from distillguard.arena.benign import TRAITS, _traits, app_templates
from distillguard.arena.pools import public_prompts
from distillguard.arena.traffic import account_id
from distillguard.detect import DetectConfig, calibrate
from distillguard.detect.calibrate import (
    FLOOR_ROOM,
    Flags,
    accounts_needed,
    cp_upper,
    replay_flags,
)
from distillguard.detect.features import extract

# the module (distillguard.detect re-exports its function under the same name)
calibrate_module = importlib.import_module("distillguard.detect.calibrate")

DETECTORS = ("volume", "timing", "shape", "template", "cot", "fresh", "linking")
# several single-account actors per kind, so a kind's TPR is a rate over accounts
CAMPAIGNS = (
    *(["bulk:1:400"] * 3),
    *(["template:1:400"] * 3),
    *(["reasoning:1:400"] * 3),
    *(["logprobs:1:1000"] * 2),
    *(["slowlow:1:90"] * 3),
    "hydra:20:60",
    "hydra:8:60",
)
EVAL_SEED_OFFSET = 1000


def cp_lower(k: int, n: int, confidence: float = 0.95) -> float:
    return 0.0 if k == 0 else float(stats.beta.ppf(1 - confidence, k, n - k + 1))


def benign_kinds(config: TrafficConfig, records: list[dict]) -> dict[str, str]:
    """Each benign account's kind: its arena trait, else 'nat' (home /24 shared by >= 10
    benign accounts), else 'popular' (sent a public prompt), else 'plain'."""
    trait = {
        account_id(config.seed, f"benign-{config.pool}", i): t for i, t in _traits(config).items()
    }
    subnets: dict[str, set[str]] = defaultdict(set)
    apps = set(app_templates(config.apps))
    popular = set()
    public = {p for p, _ in public_prompts(config.popular_prompts)}
    for r in records:
        if r["label"] != "benign":
            continue
        subnets[r["ip"].rsplit(".", 1)[0]].add(r["account"])
        msgs = r["request"]["messages"]
        if any(m["role"] == "user" and m["content"] in public for m in msgs[:2]):
            popular.add(r["account"])
        if msgs[0]["role"] == "system" and msgs[0]["content"] in apps:
            trait.setdefault(r["account"], "app")
    nat = {a for accts in subnets.values() if len(accts) >= 10 for a in accts}
    out = {}
    for r in records:
        a = r["account"]
        if r["label"] == "benign" and a not in out:
            out[a] = trait.get(a) or ("nat" if a in nat else "popular" if a in popular else "plain")
    return out


def rate(k: int, n: int) -> dict:
    return {"flagged": k, "of": n, "rate": k / n if n else None, "cp_upper95": cp_upper(k, n)}


def one_seed(seed: int, args, kinds: dict) -> dict:
    t0 = time.perf_counter()
    cal_cfg = TrafficConfig(
        benign_accounts=args.calibration_accounts, seed=seed, pool="calibration", **kinds
    )
    cal = calibrate(
        generate_traffic(cal_cfg),
        config=DetectConfig(target_fpr=args.target_fpr, detectors=DETECTORS),
        per=args.per,
    )
    t_cal = time.perf_counter() - t0
    # the eval users as independent populations (each its own draw of the eval pool, scored on
    # its own): the bundled pool replays conversations to a second user beyond ~800 users over
    # 2 days, and such pairs are one actor to linking (see the docs page)
    label: dict[str, str] = {}
    kind_of: dict[str, str] = {}
    replayed: dict[str, list[str]] = {}
    flags = Flags()
    for k in range(args.populations):
        ev_cfg = TrafficConfig(
            benign_accounts=args.benign_accounts // args.populations,
            seed=seed + EVAL_SEED_OFFSET + 100 * k,
            pool="eval",
            campaigns=CAMPAIGNS,
            **kinds,
        )
        records = generate_traffic(ev_cfg)
        label |= {r["account"]: r["label"] for r in records}
        kind_of |= benign_kinds(ev_cfg, records)
        replayed |= replay_partners(records)
        part = replay_flags(cal, sorted((extract(r) for r in records), key=lambda f: f.ts))
        flags.requests |= part.requests
        flags.days |= part.days
        flags.flagged_days |= part.flagged_days
        flags.first_flag |= part.first_flag
        flags.day_max |= part.day_max
        flags.highs |= part.highs
    benign = [a for a, lab in label.items() if lab == "benign"]
    rules = {
        "calibrated": cal.threshold,
        # the rule before this change, for comparison on the same replay
        "order_statistic": max(
            cal.stats["threshold_empirical"], cal.stats["threshold_fisher_null"]
        ),
    }
    out = {
        "seed": seed,
        "eval_seeds": [seed + EVAL_SEED_OFFSET + 100 * k for k in range(args.populations)],
        "threshold": cal.threshold,
        "calibration": cal.stats,
        "benign_accounts": len(benign),
        "benign_requests": sum(flags.requests[a] for a in benign),
        "benign_kinds": dict(Counter(kind_of[a] for a in benign)),
        "benign_with_replayed_conversation": len(replayed),
        "rules": {},
        "seconds": {"calibrate": round(t_cal, 1), "total": round(time.perf_counter() - t0, 1)},
    }
    for rule, threshold in rules.items():
        accts, days, first = flags.at(threshold)
        b_flagged = [a for a in benign if a in accts]
        b_days = [d for d in flags.days if label[d[0]] == "benign"]
        campaigns: dict[str, dict] = {}
        for a, lab in label.items():
            if lab != "benign":
                row = campaigns.setdefault(lab, {"accounts": 0, "flagged": 0, "at": []})
                row["accounts"] += 1
                if a in first:
                    row["flagged"] += 1
                    row["at"].append(first[a])
        clean = [a for a in benign if a not in replayed]
        out["rules"][rule] = {
            "threshold": threshold,
            "per_account": rate(len(b_flagged), len(benign)),
            "per_account_day": rate(sum(label[d[0]] == "benign" for d in days), len(b_days)),
            # benign accounts that got no conversation another benign account also got (the
            # arena's pool runs short at 2,000 users and hands conversations out again)
            "per_account_without_replays": rate(sum(a in accts for a in clean), len(clean)),
            "flagged_by_kind": dict(Counter(kind_of[a] for a in b_flagged)),
            "benign_flagged": [
                {
                    "account": a,
                    "kind": kind_of[a],
                    "at_request": first[a],
                    "replayed_with": replayed.get(a, [])[:3],
                }
                for a in b_flagged
            ],
            "campaigns": campaigns,
        }
    return out


def replay_partners(records: list[dict], min_shared: int = 5) -> dict[str, list[str]]:
    """Benign accounts that share at least ``min_shared`` identical user turns (not public
    prompts) with another benign account: a conversation the arena handed out twice."""
    public = {p for p, _ in public_prompts(300)}
    who: dict[str, set[str]] = defaultdict(set)
    for r in records:
        if r["label"] == "benign":
            turn = [m for m in r["request"]["messages"] if m["role"] == "user"][-1]["content"]
            if turn not in public and len(turn) > 40:  # generic turns ("continue") are shared
                who[turn].add(r["account"])
    pairs: Counter = Counter()
    for accts in who.values():
        if 1 < len(accts) <= 4:
            for a in accts:
                for b in accts:
                    if a < b:
                        pairs[a, b] += 1
    out: dict[str, list[str]] = defaultdict(list)
    for (a, b), n in pairs.items():
        if n >= min_shared:
            out[a].append(b)
            out[b].append(a)
    return dict(out)


def size_sweep(args, kinds: dict) -> dict:
    """The threshold against the calibration's size (issue 23: 400 arena users gave 91.5 and a
    plain harvester was missed, 1,600 gave 59.7): per size, the rule before (top order
    statistic) and the tail fit, and where one plain single-account harvester (bulk) and one
    low-and-slow account are first flagged under each, among 200 eval users (seed + 1000)."""
    probe = generate_traffic(
        TrafficConfig(
            benign_accounts=200,
            seed=args.seeds[0] + EVAL_SEED_OFFSET,
            pool="eval",
            campaigns=("bulk:1:400", "slowlow:1:90"),
            **kinds,
        )
    )
    feats = sorted((extract(r) for r in probe), key=lambda f: f.ts)
    label = {r["account"]: r["label"] for r in probe}
    rows = []
    for size in args.calibration_sizes:
        cal = calibrate(
            generate_traffic(
                TrafficConfig(benign_accounts=size, seed=args.seeds[0], pool="calibration", **kinds)
            ),
            config=DetectConfig(target_fpr=args.target_fpr, detectors=DETECTORS),
        )
        flags = replay_flags(cal, feats)
        s = cal.stats
        row = {
            "benign_accounts": size,
            "calibration_account_days": s["calibration_account_days"],
            "threshold": cal.threshold,
            "threshold_order_statistic": max(s["threshold_empirical"], s["threshold_fisher_null"]),
            "threshold_tail_fit": s["threshold_tail_fit"],
            "verifiable": s["verifiable"],
            "size_message": s["size_message"],
        }
        for rule in ("threshold", "threshold_order_statistic"):
            _, _, first = flags.at(row[rule])
            row[f"first_flag_under_{rule}"] = {
                lab: first.get(a) for a, lab in label.items() if lab != "benign"
            }
            row[f"benign_flagged_under_{rule}"] = sum(
                a in first for a, lab in label.items() if lab == "benign"
            )
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"code_version": code_version(), "seed": args.seeds[0], "kinds": kinds, "sizes": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[11, 23, 37])
    ap.add_argument("--calibration-accounts", type=int, default=2000)
    ap.add_argument("--benign-accounts", type=int, default=2000)
    add_population_args(ap)
    ap.add_argument("--target-fpr", type=float, default=0.001)
    ap.add_argument(
        "--per",
        choices=("account-day", "account"),
        default="account-day",
        help="what the calibration's target counts (calibrate(per=...))",
    )
    ap.add_argument("--jobs", type=int, default=1, help="seeds run in parallel processes")
    ap.add_argument(
        "--populations",
        type=int,
        default=1,
        help="split the eval users into this many independent populations, each with every "
        "campaign, scored separately (seeds S + 1000 + 100 k)",
    )
    ap.add_argument(
        "--calibration-sizes",
        type=int,
        nargs="+",
        default=None,
        help="instead: the threshold against the calibration's size (first seed only)",
    )
    ap.add_argument(
        "--old-floor",
        action="store_true",
        help="the tail floor before issue 23's change (90%% of the Fisher null), for comparison",
    )
    ap.add_argument(
        "--floor-from",
        choices=("threshold", "null"),
        default="threshold",
        help="leave a detector's room below the calibrated threshold (the default) or below the "
        "Fisher null (the rule of 54e98ad), for comparison (calibrate(floor_from=...))",
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    # the seeds' processes fork from here, so they inherit these rules
    calibrate_module.FLOOR_FROM = "null" if args.old_floor else args.floor_from
    if args.old_floor:
        calibrate_module.tail_floor = lambda target, d: math.exp(
            -0.45 * float(stats.chi2.isf(target, 2 * d))
        )
    kinds = population_kinds(args)
    if args.calibration_sizes:
        out = size_sweep(args, kinds)
        if args.out is not None:
            args.out.write_text(json.dumps(out, indent=1) + "\n")
        return
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:  # seeds are independent
        runs = list(
            pool.map(one_seed, args.seeds, [args] * len(args.seeds), [kinds] * len(args.seeds))
        )
    for seed, r in zip(args.seeds, runs):
        c = r["rules"]["calibrated"]
        print(
            f"seed {seed}: threshold {r['threshold']:.1f}, benign accounts flagged "
            f"{c['per_account']['flagged']}/{c['per_account']['of']}, days "
            f"{c['per_account_day']['flagged']}/{c['per_account_day']['of']}; "
            + ", ".join(f"{k} {v['flagged']}/{v['accounts']}" for k, v in c["campaigns"].items())
            + f" ({r['seconds']['total']} s)",
            flush=True,
        )
    pooled = {}
    for rule in runs[0]["rules"]:
        rs = [r["rules"][rule] for r in runs]

        def total(key, rs=rs):
            return rate(sum(x[key]["flagged"] for x in rs), sum(x[key]["of"] for x in rs))

        kinds_out = {}
        for k in sorted({k for x in rs for k in x["campaigns"]}):
            rows = [x["campaigns"][k] for x in rs if k in x["campaigns"]]
            n, f = sum(x["accounts"] for x in rows), sum(x["flagged"] for x in rows)
            at = [a for x in rows for a in x["at"]]
            kinds_out[k] = {
                "accounts": n,
                "flagged": f,
                "tpr": f / n,
                "cp_lower95": cp_lower(f, n),
                "median_requests_to_flag": statistics.median(at) if at else None,
                "max_requests_to_flag": max(at) if at else None,
                "per_seed_tpr": [x["flagged"] / x["accounts"] for x in rows],
            }
        per_seed = [x["per_account"]["rate"] for x in rs]
        pooled[rule] = {
            "thresholds_by_seed": [x["threshold"] for x in rs],
            "per_account": total("per_account"),
            "per_account_day": total("per_account_day"),
            "per_account_without_replays": total("per_account_without_replays"),
            "per_account_rate_by_seed": per_seed,
            "per_account_rate_spread": max(per_seed) - min(per_seed),
            "flagged_by_kind": dict(sum((Counter(x["flagged_by_kind"]) for x in rs), Counter())),
            "campaign_kinds": kinds_out,
        }
    out = {
        "code_version": code_version(),
        # the niceness it really ran at (os.nice(0) reads it)
        "command": f"nice -n {os.nice(0)} python "
        + " ".join(["bench/" + Path(sys.argv[0]).name, *sys.argv[1:]]),
        "config": vars(args)
        | {
            "out": str(args.out) if args.out else None,
            "campaigns": CAMPAIGNS,
            "detectors": DETECTORS,
            "eval_seed_offset": EVAL_SEED_OFFSET,
            # how much room a detector at its tail floor leaves the others (calibrate.tail_floor)
            "floor_room": None if args.old_floor else FLOOR_ROOM,
            "floor_from": calibrate_module.FLOOR_FROM,
            "arena_traits": dict(TRAITS),
        },
        "accounts_needed_for_target": accounts_needed(args.target_fpr),
        "pooled": pooled,
        "seeds": runs,
    }
    text = json.dumps(out, indent=1)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(json.dumps(out["pooled"], indent=1))


if __name__ == "__main__":
    main()
