"""Extraction detection, evaluated: calibrate on benign traffic only, score every campaign kind.

Traffic from the arena (``distillguard.arena.traffic``), three disjoint parts:

- calibration: ``--cal-accounts`` benign users from the *calibration* ShareGPT pool; the
  calibration splits them by account into reference / calibration / held-out;
- evaluation benign: ``--eval-accounts`` benign users from the disjoint *eval* pool (their
  tricky users included: heavy users, researchers asking for logprobs, long outputs, n>1, apps
  with one system prompt, offices behind one NAT). Keep it within the pool (~400 users over 3
  days): beyond, conversations are replayed by a second user, and accounts that send the same
  conversation are rightly linked as one actor. For more benign days, rerun with another
  ``--benign-seed`` (other users drawn from the same pool);
- campaigns: each kind generated alone (its own attack-pool text) and scored *mixed with the
  evaluation benign traffic*, one kind at a time (so two campaigns sharing the attack pool do
  not link each other and flatter the numbers). Per kind ``--attackers`` independent campaigns
  of one account each (their own random streams: addresses, parameters, prompt order, topics),
  hydra as 2 campaigns of 20 accounts; attackers of one kind draw on the same public recipes
  (templates, Evol-Instruct prompts), so they may link to each other: ``linked_attackers``
  says how many did.

Per kind: TPR at the calibrated threshold (per account; hydra also per cluster), ROC AUC of
account scores (campaign accounts vs evaluation benign accounts, scikit-learn), median
queries-to-detect (flagged_at_request; unflagged accounts count as never). Benign: FPR per
account-day on the evaluation benign users, also for the look-alike subsets. Prints JSON,
writes ``bench/results/detect_eval.json`` and the ROC plot ``bench/results/detect_roc.png``.

    nice -n 10 .venv/bin/python bench/detect_eval.py                     # defaults below
    nice -n 10 .venv/bin/python bench/detect_eval.py --cal-accounts 100 --eval-accounts 60 --quick
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from distillguard.arena.traffic import TrafficConfig, generate_traffic
from distillguard.detect import DetectConfig, calibrate, detect
from distillguard.detect.embed import shared_embedder

KINDS = ("bulk", "template", "reasoning", "logprobs", "hydra", "slowlow")
RESULTS = Path(__file__).parent / "results"
console = Console(stderr=True)


def progress_bar(label: str, total: int):
    prog = Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    )
    task = prog.add_task(label, total=total)
    return prog, (lambda k: prog.advance(task, k))


def day_of_flag(records: list[dict], account: str, index: int) -> int:
    own = sorted(r["ts"] for r in records if r["account"] == account)
    return int(own[index - 1] // 86400)


def _quantile(values: list[float], q: float) -> float | None:
    """Lower quantile of sorted values that may hold inf (never detected); None when it is inf."""
    v = values[min(len(values) - 1, int(np.floor(q * (len(values) - 1))))] if values else np.inf
    return float(v) if np.isfinite(v) else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cal-accounts", type=int, default=300)
    ap.add_argument("--eval-accounts", type=int, default=200)
    ap.add_argument("--days", type=float, default=3.0)
    ap.add_argument("--target-fpr", type=float, default=0.001)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument(
        "--attackers", type=int, default=5, help="independent one-account campaigns per kind"
    )
    ap.add_argument("--hydras", type=int, default=2, help="hydra campaigns (20 accounts each)")
    ap.add_argument(
        "--benign-seed",
        type=int,
        default=202,
        help="seed of the evaluation users (another seed: other users drawn from the same pool)",
    )
    ap.add_argument(
        "--whole-conversations",
        action="store_true",
        help="benign users replay ShareGPT's long conversations whole (TrafficConfig.whole_conversations)",
    )
    ap.add_argument("--quick", action="store_true", help="smaller campaigns (for a smoke run)")
    ap.add_argument(
        "--budget",
        choices=("default", "eager"),
        default="default",
        help="embedding budget: the default (DetectConfig) or eager (every prompt of the first window, "
        "then 1 in 4, flagged accounts too: the budget before the deferral and thinning)",
    )
    ap.add_argument(
        "--campaign-requests",
        type=int,
        default=None,
        help="requests per attacker account of bulk/template/reasoning/logprobs (default: the kind's)",
    )
    ap.add_argument("--out", default=str(RESULTS / "detect_eval.json"))
    ap.add_argument("--plot", default=str(RESULTS / "detect_roc.png"))
    ap.add_argument(
        "--save-calibration", default=None, help="also save the calibration (.npz) here"
    )
    args = ap.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    t0 = time.time()
    embedder = shared_embedder()
    cache = (
        RESULTS / ".detect_eval_embeddings.npz"
    )  # MiniLM is most of the run time; reruns reuse it
    if cache.exists():
        console.print(f"loaded {embedder.load_cache(cache)} cached embeddings")

    cal_records = generate_traffic(
        TrafficConfig(
            benign_accounts=args.cal_accounts,
            pool="calibration",
            days=args.days,
            seed=101,
            whole_conversations=args.whole_conversations,
        )
    )
    prog, step = progress_bar("calibrating", len(cal_records))
    with prog:
        config = DetectConfig(target_fpr=args.target_fpr)
        if args.budget == "eager":
            config = DetectConfig(
                target_fpr=args.target_fpr, embed_after=1, embed_every=4, embed_every_flagged=4
            )
        cal = calibrate(cal_records, config=config, embedder=embedder, progress=step)
    console.print(
        f"calibrated in {time.time() - t0:.0f} s: threshold {cal.threshold:.2f}, {cal.stats}"
    )
    RESULTS.mkdir(exist_ok=True)
    embedder.save_cache(cache)
    if args.save_calibration:
        cal.save(args.save_calibration)

    benign = generate_traffic(
        TrafficConfig(
            benign_accounts=args.eval_accounts,
            pool="eval",
            days=args.days,
            seed=args.benign_seed,
            whole_conversations=args.whole_conversations,
        )
    )
    benign_accounts = sorted({r["account"] for r in benign})
    benign_days = {(r["account"], int(r["ts"] // 86400)) for r in benign}
    lookalike = {  # the one-respect look-alikes, recognised from their traffic
        "logprobs users": {
            r["account"]
            for r in benign
            if r["request"].get("logprobs") or r["request"].get("top_logprobs")
        },
        "heavy users (top 5% by requests)": set(),
    }
    counts = defaultdict(int)
    for r in benign:
        counts[r["account"]] += 1
    cut = np.quantile(list(counts.values()), 0.95)
    lookalike["heavy users (top 5% by requests)"] = {a for a, c in counts.items() if c >= cut}

    out: dict = {
        "calibration": {"threshold": cal.threshold, "target_fpr": cal.target_fpr, **cal.stats},
        "sizes": {
            "calibration_accounts": args.cal_accounts,
            "eval_benign_accounts": args.eval_accounts,
            "days": args.days,
            "attackers_per_kind": args.attackers,
            "hydra_campaigns": args.hydras,
            "campaign_requests": 300 if args.quick else args.campaign_requests,
            "whole_conversations": args.whole_conversations,
        },
        "config": cal.config.to_dict(),
        "kinds": {},
    }
    benign_scores: dict[str, float] | None = None
    benign_flag_days: set = set()
    benign_flagged_examples: list = []
    curves = {}
    from scipy.stats import beta
    from sklearn.metrics import roc_auc_score, roc_curve

    for n, kind in enumerate(kinds):
        cap = 300 if args.quick else args.campaign_requests
        spec = f"{kind}:1:{cap}" if cap and kind not in ("hydra", "slowlow") else f"{kind}:1"
        specs = ("hydra",) * args.hydras if kind == "hydra" else (spec,) * args.attackers
        camp = generate_traffic(
            TrafficConfig(benign_accounts=0, campaigns=specs, days=args.days, seed=300 + n)
        )
        records = benign + camp
        prog, step = progress_bar(f"scoring {kind}", len(records))
        with prog:
            report = detect(records, cal, embedder=embedder, progress=step)
        rows = {r.account: r for r in report["results"]}
        if (
            benign_scores is None
        ):  # benign scores are the same in every run up to linking with the campaign
            benign_scores = {a: rows[a].score for a in benign_accounts}
            benign_flag_days = {
                (a, day_of_flag(benign, a, rows[a].flagged_at_request))
                for a in benign_accounts
                if rows[a].flagged
            }
            # why they were flagged: what a reviewer of the false positives would read
            benign_flagged_examples = [
                {
                    "account": a,
                    "requests": rows[a].requests,
                    "flagged_at_request": rows[a].flagged_at_request,
                    "reasons": rows[a].reasons[:5],
                }
                for a in benign_accounts
                if rows[a].flagged
            ][:10]
        attack = sorted({r["account"] for r in camp})
        y = np.r_[np.zeros(len(benign_accounts)), np.ones(len(attack))]
        s = np.r_[[rows[a].score for a in benign_accounts], [rows[a].score for a in attack]]
        fpr, tpr, _ = roc_curve(y, s)
        curves[kind] = (fpr, tpr)
        q = [rows[a].flagged_at_request for a in attack]
        q_all = sorted(x if x is not None else np.inf for x in q)
        flagged_n = sum(rows[a].flagged for a in attack)
        campaign_of = {r["account"]: r.get("campaign") for r in camp}
        by_campaign = defaultdict(list)
        for a in attack:
            by_campaign[campaign_of[a]].append(a)
        entry = {
            "accounts": len(attack),
            "campaigns": len(by_campaign),
            "requests_per_account": round(len(camp) / len(attack), 1),
            "tpr": float(flagged_n / len(attack)),
            # one-sided 95% lower bound (Clopper-Pearson) on the per-account TPR
            "tpr_lower95": float(beta.ppf(0.05, flagged_n, len(attack) - flagged_n + 1))
            if flagged_n
            else 0.0,
            "tpr_per_campaign": float(
                np.mean([any(rows[a].flagged for a in acc) for acc in by_campaign.values()])
            ),
            "linked_attackers": sum(rows[a].cluster is not None for a in attack),
            # each attacker on its own requests, linking evidence dropped (attackers of one kind
            # share public recipes and pool text and may link to each other, which helps them get caught)
            "solo_tpr": float(
                np.mean([rows[a].solo_flagged_at_request is not None for a in attack])
            ),
            "solo_median_queries_to_detect": _quantile(
                sorted(rows[a].solo_flagged_at_request or np.inf for a in attack), 0.5
            ),
            "roc_auc": float(roc_auc_score(y, s)),
            # unflagged accounts count as never (inf); null when the quantile itself is "never"
            "median_queries_to_detect": _quantile(q_all, 0.5),
            "queries_to_detect_p90": _quantile(q_all, 0.9),
            "benign_flagged_in_this_mix": sum(rows[a].flagged for a in benign_accounts),
            "top_reasons": rows[attack[0]].reasons[:4],
        }
        if kind == "hydra":
            clusters = {rows[a].cluster for a in attack}
            entry["clusters"] = {
                "distinct": len(clusters - {None}),
                "unlinked_accounts": sum(rows[a].cluster is None for a in attack),
                "largest": max(
                    (sum(rows[a].cluster == c for a in attack) for c in clusters - {None}),
                    default=0,
                ),
                "benign_accounts_in_them": sum(
                    rows[a].cluster in clusters - {None} for a in benign_accounts
                ),
            }
            entry["tpr_per_cluster"] = (
                float(
                    np.mean(
                        [
                            any(rows[a].flagged for a in attack if rows[a].cluster == c)
                            for c in clusters - {None}
                        ]
                    )
                )
                if clusters - {None}
                else 0.0
            )
        out["kinds"][kind] = entry
        console.print(kind, json.dumps(entry))
        embedder.save_cache(cache)

    out["benign"] = {
        "accounts": len(benign_accounts),
        "account_days": len(benign_days),
        "flagged_account_days": len(benign_flag_days),
        "fpr_per_account_day": len(benign_flag_days) / len(benign_days),
        "lookalikes": {
            name: {
                "accounts": len(acc),
                "flagged": sum(a in {x for x, _ in benign_flag_days} for a in acc),
            }
            for name, acc in lookalike.items()
        },
        "flagged_examples": benign_flagged_examples,
    }
    out["seconds"] = round(time.time() - t0, 1)
    RESULTS.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    for kind, (fpr, tpr) in curves.items():
        ax.plot(
            np.maximum(fpr, 1e-3), tpr, label=f"{kind} (AUC {out['kinds'][kind]['roc_auc']:.3f})"
        )
    ax.axvline(max(args.target_fpr, 1e-3), color="grey", ls=":", lw=1, label="target FPR")
    ax.set_xscale("log")
    ax.set_xlabel("benign accounts flagged (FPR, log; 0 drawn at 1e-3)")
    ax.set_ylabel("campaign accounts flagged (TPR)")
    ax.set_title("distillguard detect: per-account ROC by campaign kind")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    console.print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
