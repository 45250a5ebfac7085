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
from their first to their last flag; ``--no-pool-clusters`` replays the per-account count of
before.

The time rule (``serve --extracting-after-s``, default 12 h): the main run has it off unless
``--extracting-after-hours`` is given, and ``time_rules`` replays the same monitor verdicts through
the ladder at each ``--time-rules`` value (0: off), so the rules differ only in the levels they
make of one detection: benign accounts each takes to ``extracting`` (Clopper-Pearson; the canaries
they were served) and campaign accounts, by kind and by which count. ``--lone-slowlow`` adds lone
low-and-slow accounts to every population, with prompts nobody else in it sends (``lone_slowlow``):
the arena's ``slowlow`` campaign shares the attack pool with every other campaign, so its
accounts are linked to them and escalate through them; a lone one sends none of their prompts
(its templated ones, ``--lone-template-share``, may still resemble a template campaign's).

Not modelled: the feedback of throttling on a user's traffic (a throttled benign user's 429s,
measured by ``bench/policy_impact.py``, would not reach the monitor as answered requests).

The populations and calibration of ``detect_fpr.py``'s per-account run (the seeds of
``detect_fpr_populations_per_account.json``, whose flagged benign accounts this must reproduce
at ``suspect``: the gateway's incremental path and the offline replay are meant to agree); 4
minutes with 3 jobs on the shared 2-core machine under SCHED_IDLE at load 2-5, 13 at load 12:

    chrt -i 0 nice -n 19 .venv/bin/python bench/ladder_false_positives.py --seeds 41 53 67 \\
        --jobs 3 --calibration-accounts 2000 --benign-accounts 2400 --populations 3 \\
        --per account --time-rules 0 3 6 12 24 --out bench/results/ladder_false_positives.json

and with ``--lone-template-share 0 --out bench/results/ladder_false_positives_lone_no_templates.json``.
"""

from __future__ import annotations

import argparse
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
from detect_fpr import CAMPAIGNS, DETECTORS, EVAL_SEED_OFFSET, benign_kinds
from scipy import stats

from distillguard.arena import TrafficConfig, generate_traffic
from distillguard.arena.base import Call, CampaignContext, account_id, random_ip, stream_rng
from distillguard.arena.campaign_material import _by_topic_round_robin, _template_prompt
from distillguard.arena.campaigns import _human_times, _seed_prompts
from distillguard.arena.pools import load_pools, normalise, public_prompts
from distillguard.arena.traffic import _record
from distillguard.detect import DetectConfig, calibrate
from distillguard.detect.calibrate import cp_upper
from distillguard.detect.monitor import AccountMonitor
from distillguard.guard.monitor import MAX_BATCH
from distillguard.guard.online import OnlineDetection
from distillguard.guard.policy import Level, PolicyConfig

LEVELS = (Level.WATCH, Level.SUSPECT, Level.EXTRACTING)
LONE = "slowlow-lone"  # the label of a lone low-and-slow account (``lone_slowlow``)


def lone_slowlow(records: list[dict], config: TrafficConfig, args) -> list[dict]:
    """``--lone-slowlow`` low-and-slow accounts that share no prompt with anyone in ``records``.

    The arena's ``slowlow`` campaign draws on the attack pool every other campaign sweeps too, so
    each of its accounts ends up linked to other campaigns (and escalates through them). A lone
    one, a single careful distiller, has prompts of its own: here attack-pool first turns that
    no account of this population sent, that are not public prompts, and that occur once in the
    pool, dealt into disjoint shares, one per account. Otherwise it behaves as ``slowlow``: a
    person's hours and pace over every day from one home address, streaming, each prompt
    single-turn on the next topic, ``--lone-template-share`` of them filled from the arena's
    generic templates with the account's own random subjects. Built from the campaign's own
    helpers rather than registered: the arena's campaigns all draw from one shared pool."""
    if args.lone_slowlow == 0:
        return []
    seeds = _seed_prompts(load_pools(config.whole_conversations)["attack"])
    sent = {
        normalise(m["content"])
        for r in records
        for m in r["request"]["messages"]
        if m.get("role") == "user" and isinstance(m.get("content"), str)
    }
    sent |= {normalise(p) for p, _ in public_prompts(config.popular_prompts)}
    times_in_pool = Counter(normalise(p[0]) for p in seeds)
    private = [
        p for p in seeds if times_in_pool[normalise(p[0])] == 1 and normalise(p[0]) not in sent
    ]
    stream_rng(config.seed, LONE).shuffle(private)
    out = []
    for j in range(args.lone_slowlow):
        cid = f"{LONE}-{j + 1}"
        ctx = CampaignContext(
            campaign_id=cid,
            kind=LONE,
            accounts=(account_id(config.seed, cid, 0),),
            requests_per_account=args.lone_slowlow_requests,
            start=config.start,
            end=config.end,
            rpm_limit=config.rpm_limit,
            decoy_share=config.decoy_share,
            model=config.model,
            rng=stream_rng(config.seed, cid),
            attack=(),
        )
        rng = ctx.rng
        own = _by_topic_round_robin(rng, private[j :: args.lone_slowlow])
        if len(own) < ctx.requests_per_account:
            raise SystemExit(
                f"--lone-slowlow {args.lone_slowlow}: {len(private)} private prompts leave "
                f"{len(own)} per account, fewer than --lone-slowlow-requests "
                f"{ctx.requests_per_account}; ask for fewer accounts or requests"
            )
        account, ip = ctx.accounts[0], random_ip(rng)
        times = _human_times(rng, ctx, ctx.requests_per_account, tz=rng.choice((-5, 1, 8)))
        for (text, tokens, _), t in zip(own, times, strict=False):
            if rng.random() < args.lone_template_share:
                text, tokens = _template_prompt(rng), int(rng.lognormvariate(math.log(350), 0.5))
            call = Call(
                t,
                account,
                ip,
                ctx.request([{"role": "user", "content": text}], stream=True),
                tokens,
            )
            if config.start <= t < config.end:
                out.append(_record(call, LONE, cid))
    return out


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


def monitor_verdicts(records: list[dict], calibration) -> list:
    """The monitor's verdict on each of ``records`` (time order), in batches of the worker's size."""
    monitor = AccountMonitor(calibration)
    out: list = []
    for start in range(0, len(records), MAX_BATCH):
        out.extend(monitor.observe_batch(records[start : start + MAX_BATCH]))
    return out


def replay(
    records: list[dict], verdicts: list, policy: PolicyConfig, args, hours: float | None
) -> dict:
    """Each account's path through the ladder when ``records`` (time order) reach a gateway whose
    monitor gave ``verdicts``, with the time rule at ``hours`` (None: off). Detection does not
    depend on the ladder (throttling's feedback is not modelled), so every rule reads the same
    verdicts and differs only in the levels it makes of them."""
    online = OnlineDetection(
        None,
        extracting_after=args.extracting_after,
        pool_clusters=not args.no_pool_clusters,
        extracting_after_s=hours * 3600 if hours else None,
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
        levels = online.levels(verdicts[start : start + MAX_BATCH], batch)
        for r, verdict in zip(batch, levels, strict=True):
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
    by_rule: dict[str, dict[str, dict]] = {_rule(h): {} for h in args.time_rules}
    for k in range(args.populations):
        ev_cfg = TrafficConfig(
            benign_accounts=args.benign_accounts // args.populations,
            seed=seed + EVAL_SEED_OFFSET + 100 * k,
            pool="eval",
            campaigns=CAMPAIGNS,
            **kinds,
        )
        records = generate_traffic(ev_cfg)
        records = sorted(records + lone_slowlow(records, ev_cfg, args), key=lambda r: r["ts"])
        label |= {r["account"]: r["label"] for r in records}
        kind_of |= benign_kinds(ev_cfg, records)
        verdicts = monitor_verdicts(records, cal)
        part = replay(records, verdicts, policy, args, args.extracting_after_hours)
        requests |= part["requests"]
        reached |= part["reached"]
        for hours in args.time_rules:
            by_rule[_rule(hours)] |= replay(records, verdicts, policy, args, hours)["reached"]
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
            if label[a] in ("hydra", "slowlow", LONE)
        ],
        # the same verdicts through the ladder with each --time-rules value: who reaches
        # extracting, how (by), and the canaries a benign one was served
        "time_rules": {
            rule: {
                "benign_extracting": [
                    {"account": a, "kind": kind_of[a], **got[a]["extracting"]}
                    for a in benign
                    if "extracting" in got.get(a, {})
                ],
                "extracting": dict(
                    Counter(label[a] for a, lv in got.items() if "extracting" in lv)
                ),
                "extracting_by": dict(
                    Counter(
                        f"{label[a]}:{lv['extracting'].get('by', '?')}"
                        for a, lv in got.items()
                        if "extracting" in lv and label[a] != "benign"
                    )
                ),
                "lone_linked": sum(
                    got.get(a, {}).get("flags", {}).get("linked", False)
                    for a in label
                    if label[a] == LONE
                ),
            }
            for rule, got in by_rule.items()
        },
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


def _rule(hours: float | None) -> str:
    return f"{hours:g}h" if hours else "off"


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
    # Each --time-rules value replayed on the same verdicts: benign accounts it takes to
    # extracting (Clopper-Pearson) and the campaign accounts it does, by kind and by which count.
    accounts = Counter(row["kind"] for row in (x for r in runs for x in r["campaign_reached"]))
    out["time_rules"] = {}
    for rule in runs[0]["time_rules"]:
        rows = [x for r in runs for x in r["time_rules"][rule]["benign_extracting"]]
        entry = clopper_pearson(len(rows), n)
        entry["per_seed"] = [len(r["time_rules"][rule]["benign_extracting"]) for r in runs]
        entry["canaries_served"] = sum(x["canaries_served"] for x in rows)
        got: Counter = Counter()
        by: Counter = Counter()
        for r in runs:
            got.update(r["time_rules"][rule]["extracting"])
            by.update(r["time_rules"][rule]["extracting_by"])
        out["time_rules"][rule] = {
            "benign_extracting": entry,
            **{
                kind: {
                    "extracting": got[kind],
                    "of": accounts[kind],
                    "by": {
                        k.split(":", 1)[1]: v
                        for k, v in sorted(by.items())
                        if k.startswith(kind + ":")
                    },
                }
                for kind in ("hydra", "slowlow", LONE)
            },
            "lone_linked": sum(r["time_rules"][rule]["lone_linked"] for r in runs),
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
        help="also 'extracting' when flagged again this many hours after the first flag in the "
        "main run (default: off; serve's default, 12 h, is among --time-rules)",
    )
    ap.add_argument(
        "--time-rules",
        type=float,
        nargs="*",
        default=[0, 6, 12, 24],
        help="hours of the time rule to replay on the same verdicts besides the main run "
        "(0: off); reported in time_rules",
    )
    ap.add_argument(
        "--lone-slowlow",
        type=int,
        default=3,
        help="lone low-and-slow accounts per population, with prompts nobody else sends",
    )
    ap.add_argument("--lone-slowlow-requests", type=int, default=90)
    ap.add_argument(
        "--lone-template-share",
        type=float,
        default=0.3,
        help="share of a lone account's prompts filled from generic templates (slowlow's)",
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
