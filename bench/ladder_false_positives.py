"""How many benign accounts the default policy ladder takes to ``suspect`` and ``extracting``
(issue 28), and for how long.

``bench/detect_fpr.py`` counts benign accounts the detectors flag; this follows what the gateway
then does to them. Per seed: calibrate on ``--calibration-accounts`` benign users of the
*calibration* pool drawn with generator seed S, then replay ``--benign-accounts`` users of the
disjoint *eval* pool (seeds S + 1000 + 100 k, one independent population per k, every
benign kind of ``detect_fpr.py``: Zipf-popular prompts, apps sharing a system prompt, large NATs,
heavy users) mixed with its campaigns, in time order, through the gateway's own code with no
HTTP: :class:`distillguard.guard.online.OnlineDetection` over
:class:`distillguard.detect.monitor.AccountMonitor` (what ``serve --detect`` runs, in batches of
the monitor worker's size) turns verdicts into levels, escalation only, as
``guard/monitor.escalations`` records them; each request is decided by the default
:class:`distillguard.guard.policy.PolicyConfig` at the level its account held when it arrived
(the verdict of an account's request applies from its next request: the fastest a gateway
applies it), and ``Decision.is_canary`` says which answers would have been canaries.

Counted per benign account, with Clopper-Pearson bounds, per seed and pooled: reached
``watch`` / ``suspect`` / ``extracting``; for each account that did, the request at which it
did, the requests it then sent at that level (to the end of the window: online verdicts never
lower a level, only an admin does), the hours from reaching it to its last request, and the
canaries it was served. The campaigns of the same populations are counted the same way, as a
check that the replay escalates extraction (the truth is known there).

Linked actors (issue 23): a campaign account that reached ``extracting`` says by which count
(``by``: its own flags, its community's flags counted together, or a time rule) and, for a
community, who was in it (ground-truth labels: its own campaign's keys, or other actors too).
The hydra and low-and-slow accounts (``campaign_reached``) keep their flag counts and the hours
from their first to their last flag, from which ``time_rule`` says exactly which accounts a rule
"flagged again T hours after the first flag" would add (``--extracting-after-hours`` runs it);
``--no-pool-clusters`` replays the per-account count of before.

Not modelled: the feedback of throttling on a user's traffic (a throttled benign user's 429s,
measured by ``bench/policy_impact.py``, would not reach the monitor as answered requests).

The populations and calibration of ``detect_fpr.py``'s per-account run (the seeds of
``detect_fpr_populations_per_account.json``, whose flagged benign accounts this must reproduce
at ``suspect``: the gateway's incremental path and the offline replay are meant to agree); 8
minutes with 3 jobs on the shared 2-core machine:

    nice -n 10 .venv/bin/python bench/ladder_false_positives.py --seeds 41 53 67 --jobs 3 \\
        --calibration-accounts 2000 --benign-accounts 2400 --populations 3 --per account \\
        --out bench/results/ladder_false_positives.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from _population import add_population_args, population_kinds
from _provenance import code_version
from detect_fpr import CAMPAIGNS, DETECTORS, EVAL_SEED_OFFSET, benign_kinds
from scipy import stats

from distillguard.arena import TrafficConfig, generate_traffic
from distillguard.detect import DetectConfig, calibrate
from distillguard.detect.calibrate import cp_upper
from distillguard.detect.monitor import AccountMonitor
from distillguard.guard.monitor import MAX_BATCH
from distillguard.guard.online import OnlineDetection
from distillguard.guard.policy import Level, PolicyConfig

LEVELS = (Level.WATCH, Level.SUSPECT, Level.EXTRACTING)


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> dict:
    """The rate k/n with its two-sided Clopper-Pearson interval and one-sided upper bound."""
    if n == 0:
        return {"accounts": k, "of": n, "rate": None}
    tail = (1 - confidence) / 2
    lo = 0.0 if k == 0 else float(stats.beta.ppf(tail, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - tail, k + 1, n - k))
    return {"accounts": k, "of": n, "rate": k / n, "cp95": [lo, hi], "cp_upper95": cp_upper(k, n)}


def _escalated_by(reasons: tuple[str, ...]) -> str:
    """Which count made an account ``extracting`` (OnlineDetection's first reason names it)."""
    why = reasons[0] if reasons else ""
    return (
        "own"
        if why.startswith("still flagged")
        else "cluster"
        if " flagged requests together" in why
        else "time"
        if why.startswith("flagged again")
        else "?"
    )


def replay(records: list[dict], calibration, policy: PolicyConfig, args) -> dict:
    """Each account's path through the ladder when ``records`` (time order) reach a gateway."""
    online = OnlineDetection(
        AccountMonitor(calibration),
        extracting_after=args.extracting_after,
        pool_clusters=not args.no_pool_clusters,
        extracting_after_s=args.extracting_after_hours * 3600
        if args.extracting_after_hours
        else None,
    )
    flagged_ts: dict[str, list[float]] = {}  # first and last flagged request
    escalated_by: dict[str, str] = {}
    # who is in the community that made an account extracting: its members' labels (ground truth,
    # as of the end of that monitor batch): does a campaign escalate with its own keys only?
    label = {r["account"]: r.get("label", "?") for r in records}
    campaign = {r["account"]: r.get("campaign") for r in records}
    together: dict[str, dict] = {}
    level: dict[str, Level] = {}
    n: Counter = Counter()
    last_ts: dict[str, float] = {}
    reached: dict[str, dict[str, dict]] = defaultdict(dict)
    served: dict[str, Counter] = defaultdict(Counter)  # requests per level they were decided at
    canaries: dict[str, Counter] = defaultdict(Counter)
    decisions = {lvl: policy.decide(lvl) for lvl in Level}
    for start in range(0, len(records), MAX_BATCH):
        batch = records[start : start + MAX_BATCH]
        for r, verdict in zip(batch, online.observe_batch(batch), strict=True):
            a = r["account"]
            n[a] += 1
            last_ts[a] = r["ts"]
            now = level.get(a, Level.OK)
            served[a][now.name.lower()] += 1
            if decisions[now].is_canary(f"req-{a}-{n[a]}"):
                canaries[a][now.name.lower()] += 1
            if verdict is not None and verdict.level >= Level.SUSPECT:
                flagged_ts.setdefault(a, [r["ts"], r["ts"]])[1] = r["ts"]
            if verdict is not None and verdict.level > now:  # online verdicts only escalate
                level[a] = verdict.level
                if verdict.level == Level.EXTRACTING:
                    escalated_by[a] = _escalated_by(verdict.reasons)
                    members = online._community.get(a) or ()
                    if escalated_by[a] == "cluster":
                        together[a] = {
                            "accounts": len(members),
                            "labels": dict(Counter(label[m] for m in members)),
                            "other_actors": sum(
                                campaign[m] is None or campaign[m] != campaign[a] for m in members
                            ),
                        }
                for lvl in LEVELS:
                    if now < lvl <= verdict.level:
                        reached[a][lvl.name.lower()] = {"request": n[a], "ts": r["ts"]}
    out = {}
    for a, levels in reached.items():
        out[a] = {}
        for name, at in levels.items():
            lvl = Level[name.upper()]
            out[a][name] = {
                "at_request": at["request"],
                # requests after it, all decided at this level or higher (never lower)
                "requests_after": n[a] - at["request"],
                "requests_at_level": served[a][name],
                "hours_to_last_request": (last_ts[a] - at["ts"]) / 3600,
                "canaries_served": sum(
                    c for lv, c in canaries[a].items() if Level[lv.upper()] >= lvl
                ),
            }
        if a in escalated_by:
            out[a]["extracting"]["by"] = escalated_by[a]
        if a in together:
            out[a]["extracting"]["community"] = together[a]
        if a in flagged_ts:
            # flagged requests; whether they count for a community too (a flag carried one); hours
            # from the first to the last (what a time rule, --extracting-after-hours, would see)
            first, last = flagged_ts[a]
            out[a]["flags"] = {
                "own": online._flags.get(a, 0),
                "linked": a in online._linked,
                "hours_first_to_last": (last - first) / 3600,
            }
    return {"requests": dict(n), "reached": out}


def one_seed(seed: int, args, kinds: dict) -> dict:
    t0 = time.perf_counter()
    cal = calibrate(
        generate_traffic(
            TrafficConfig(
                benign_accounts=args.calibration_accounts, seed=seed, pool="calibration", **kinds
            )
        ),
        config=DetectConfig(target_fpr=args.target_fpr, detectors=DETECTORS),
        per=args.per,
    )
    t_cal = time.perf_counter() - t0
    policy = PolicyConfig()  # the default ladder, as `serve` without --policy
    label: dict[str, str] = {}
    kind_of: dict[str, str] = {}
    requests: dict[str, int] = {}
    reached: dict[str, dict] = {}
    for k in range(args.populations):
        ev_cfg = TrafficConfig(
            benign_accounts=args.benign_accounts // args.populations,
            seed=seed + EVAL_SEED_OFFSET + 100 * k,
            pool="eval",
            campaigns=CAMPAIGNS,
            **kinds,
        )
        records = sorted(generate_traffic(ev_cfg), key=lambda r: r["ts"])
        label |= {r["account"]: r["label"] for r in records}
        kind_of |= benign_kinds(ev_cfg, records)
        part = replay(records, cal, policy, args)
        requests |= part["requests"]
        reached |= part["reached"]
    benign = sorted(a for a, lab in label.items() if lab == "benign")
    out = {
        "seed": seed,
        "eval_seeds": [seed + EVAL_SEED_OFFSET + 100 * k for k in range(args.populations)],
        "threshold": cal.threshold,
        "benign_accounts": len(benign),
        "benign_requests": sum(requests[a] for a in benign),
        "benign_kinds": dict(Counter(kind_of[a] for a in benign)),
        "benign": {},
        "benign_reached": [
            {"account": a, "kind": kind_of[a], "requests": requests[a], **reached[a]}
            for a in benign
            if a in reached
        ],
        "campaigns": {},
        # the campaigns' hydra and low-and-slow accounts, the ones a per-account count never made
        # extracting: how each got there (or not), with whom, and how long it stayed flagged
        "campaign_reached": [
            {"account": a, "kind": label[a], "requests": requests[a], **reached.get(a, {})}
            for a in sorted(label)
            if label[a] in ("hydra", "slowlow")
        ],
        "seconds": {"calibrate": round(t_cal, 1)},
    }
    # "reached" a level: at it or above at some request (a jump from ok to suspect passes watch)
    for lvl in LEVELS:
        name = lvl.name.lower()
        out["benign"][name] = sum(name in reached.get(a, {}) for a in benign)
    at_extracting: dict[str, list[int]] = defaultdict(list)
    for a, lab in label.items():
        if lab != "benign":
            row = out["campaigns"].setdefault(lab, Counter())
            row["accounts"] += 1
            mine = reached.get(a, {})
            row.update(name for name in mine if name in {lvl.name.lower() for lvl in LEVELS})
            if "extracting" in mine:
                row["extracting_by_" + mine["extracting"].get("by", "?")] += 1
                # escalated with a community that holds other actors (other campaigns, benign users)
                row["extracting_by_cluster_with_others"] += bool(
                    mine["extracting"].get("community", {}).get("other_actors")
                )
                at_extracting[lab].append(mine["extracting"]["at_request"])
            if "flags" in mine:
                row["flagged_requests"] += mine["flags"]["own"]
                row["linked_flagged_requests"] += mine["flags"]["linked"]
    out["campaigns"] = {k: dict(v) for k, v in out["campaigns"].items()}
    # requests each campaign account had sent when it reached extracting (pooled: median over seeds)
    out["campaign_extracting_at_request"] = {k: sorted(v) for k, v in at_extracting.items()}
    out["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    return out


def pooled(runs: list[dict]) -> dict:
    n = sum(r["benign_accounts"] for r in runs)
    rows = [row for r in runs for row in r["benign_reached"]]
    out: dict = {"benign_accounts": n, "benign_requests": sum(r["benign_requests"] for r in runs)}
    for lvl in LEVELS:
        name = lvl.name.lower()
        mine = [row[name] for row in rows if name in row]
        entry = clopper_pearson(len(mine), n)
        entry["per_seed"] = [r["benign"][name] for r in runs]
        if mine:
            for key in ("at_request", "requests_at_level", "hours_to_last_request"):
                vals = [m[key] for m in mine]
                entry[key] = {"median": statistics.median(vals), "max": max(vals)}
            entry["canaries_served"] = sum(m["canaries_served"] for m in mine)
        out[name] = entry
    campaigns: dict[str, dict] = {}
    for r in runs:
        for kind, row in r["campaigns"].items():
            c = campaigns.setdefault(kind, Counter())
            c.update(row)
    out["campaigns"] = {k: dict(v) for k, v in sorted(campaigns.items())}
    for kind, row in out["campaigns"].items():
        at = [x for r in runs for x in r.get("campaign_extracting_at_request", {}).get(kind, [])]
        row["extracting_rate"] = row.get("extracting", 0) / row["accounts"]
        if at:
            row["extracting_at_request"] = {"median": statistics.median(at), "max": max(at)}
    # A time rule (OnlineDetection's extracting_after_s, --extracting-after-hours) makes an account
    # extracting iff it is flagged again T hours after its first flag, i.e. iff its first-to-last
    # flag span is >= T: so who it would add to this run's extracting accounts is exact from the
    # spans (when it would, is not). Low-and-slow accounts may never send extracting_after requests.
    camp_rows = [row for r in runs for row in r.get("campaign_reached", [])]

    def reaches(row, hours):
        return "extracting" in row or row.get("flags", {}).get("hours_first_to_last", 0) >= hours

    out["time_rule"] = {
        f"{hours}h": {
            "benign_extracting": clopper_pearson(sum(reaches(row, hours) for row in rows), n),
            **{
                kind: {
                    "extracting": sum(
                        reaches(row, hours) for row in camp_rows if row["kind"] == kind
                    ),
                    "of": sum(row["kind"] == kind for row in camp_rows),
                }
                for kind in ("hydra", "slowlow")
            },
        }
        for hours in (12, 24, 48)
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[41, 53, 67])
    ap.add_argument("--calibration-accounts", type=int, default=2000)
    ap.add_argument("--benign-accounts", type=int, default=2400)
    ap.add_argument(
        "--populations",
        type=int,
        default=3,
        help="split the eval users into this many independent populations (as detect_fpr.py)",
    )
    add_population_args(ap)
    ap.add_argument("--target-fpr", type=float, default=0.001)
    ap.add_argument(
        "--per",
        choices=("account-day", "account"),
        default="account-day",
        help="what the calibration's target counts (the CLI's `detect --calibrate`: account-day)",
    )
    ap.add_argument(
        "--extracting-after",
        type=int,
        default=100,
        help="flagged requests before 'extracting' (serve's --extracting-after, default 100)",
    )
    ap.add_argument(
        "--no-pool-clusters",
        action="store_true",
        help="count each account's flags alone (the ladder before issue 23's cluster escalation)",
    )
    ap.add_argument(
        "--extracting-after-hours",
        type=float,
        default=None,
        help="also 'extracting' when flagged again this many hours after the first flag",
    )
    ap.add_argument("--jobs", type=int, default=1, help="seeds run in parallel processes")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    kinds = population_kinds(args)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:  # seeds are independent
        runs = list(
            pool.map(one_seed, args.seeds, [args] * len(args.seeds), [kinds] * len(args.seeds))
        )
    for r in runs:
        print(
            f"seed {r['seed']}: threshold {r['threshold']:.1f}, of {r['benign_accounts']} benign "
            + ", ".join(f"{k} {v}" for k, v in r["benign"].items())
            + f" ({r['seconds']['total']} s)",
            flush=True,
        )
    out = {
        "code_version": code_version(),
        "command": f"nice -n {os.nice(0)} python "
        + " ".join(["bench/" + Path(sys.argv[0]).name, *sys.argv[1:]]),
        "config": vars(args)
        | {
            "out": str(args.out) if args.out else None,
            "campaigns": CAMPAIGNS,
            "detectors": DETECTORS,
            "eval_seed_offset": EVAL_SEED_OFFSET,
            "ladder": PolicyConfig().ladder,
            "monitor_batch": MAX_BATCH,
        },
        "seconds": round(time.perf_counter() - t0, 1),
        "pooled": pooled(runs),
        "seeds": runs,
    }
    text = json.dumps(out, indent=1)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(json.dumps(out["pooled"], indent=1))


if __name__ == "__main__":
    main()
