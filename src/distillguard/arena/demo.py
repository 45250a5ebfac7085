"""``distillguard demo``: the arena's default scenario, provider against distiller against investigator.

Five acts on one machine, every part real (the gateway is ``distillguard serve`` in a subprocess
on loopback, clients speak HTTP to it, the ledger is SQLite):

1. **Detection on labelled traffic.** The detectors are calibrated on benign arena users (the
   *calibration* ShareGPT pool) to a target false-positive rate, then score held-out benign users
   (the *eval* pool) mixed with one campaign of each kind, one kind at a time (campaigns share
   the attack pool and would link each other if mixed). Ground truth is known: how many
   campaign accounts are caught, after how many requests, and how many benign users are not.
2. **Live traffic.** The gateway serves the teacher with the watermark on, online detection
   from that calibration and a graduated policy ladder. A distiller harvests it with
   ``distill.harvest`` (its own account), while benign users ask a few questions each with the
   real ``openai`` client. The ledger then says when the distiller was flagged, what the policy
   did to it (logprobs stripped, stronger watermark, canaries) and whether any user was touched.
3. **Tracing the harvested data.** An investigator who finds the distiller's dataset tests it
   against every account's watermark key (exact p-values, Holm over accounts). Controls with
   known truth: each user's own answers, and ShareGPT answers written by another model.
4. **The suspect model** (unless ``student=None``): a student trained on the harvested data by
   ``distill curate`` and ``distill train`` is tested for the canaries served to the distiller
   (exact rank p-values, Fisher per account, Holm), against the untrained student as control;
   then judged by the one forensics report (:mod:`distillguard.arena.demo_forensics`: identity,
   similarity, radioactivity, canaries, one Holm verdict naming the accounts it traces to), and
   by the API-only canary test with the student and its control served on loopback.
5. **What the student learned** (unless ``quality_prompts=0``): the student and the untrained
   student scored against the teacher on held-out prompts no account sent, by ``distill eval``'s
   measures, beside what the distiller spent on teacher queries.

:func:`run_demo` returns the report (also written to ``OUT/demo.json``); the CLI prints it.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from distillguard.arena.demo_config import CANARY_DECOYS, DISTILLER, KINDS, POLICY, DemoConfig, Say
from distillguard.arena.demo_forensics import act_forensics
from distillguard.arena.demo_live import act_live, gateway
from distillguard.arena.demo_quality import act_quality, held_out_prompts
from distillguard.jsonl import read_jsonl

__all__ = [
    "DISTILLER",
    "KINDS",
    "POLICY",
    "DemoConfig",
    "DemoHooks",
    "Say",
    "act_detection",
    "act_forensics",
    "act_live",
    "act_quality",
    "act_student",
    "act_trace",
    "gateway",
    "held_out_prompts",
    "run_demo",
    "stage_keys",
]


# ---- act 1: detection on labelled arena traffic ---------------------------------------------


def act_detection(
    cfg: DemoConfig, say: Say, progress: Callable[[str, int], Callable[[int], None]]
) -> dict:
    """Calibrate on benign users, score each campaign kind mixed with held-out benign users."""
    from distillguard.arena.traffic import TrafficConfig, generate_traffic
    from distillguard.detect import DetectConfig, calibrate, detect
    from distillguard.detect.embed import shared_embedder

    embedder = shared_embedder()
    cal_records = generate_traffic(
        TrafficConfig(benign_accounts=cfg.cal_accounts, pool="calibration", seed=cfg.seed + 101)
    )
    cal = calibrate(
        cal_records,
        config=DetectConfig(target_fpr=cfg.target_fpr),
        embedder=embedder,
        progress=progress(f"calibrating on {cfg.cal_accounts} benign users", len(cal_records)),
    )
    cal.save(cfg.out / "calibration.npz")
    say(
        f"calibrated on {len(cal_records)} requests of {cfg.cal_accounts} benign users: threshold "
        f"{cal.threshold:.1f} for a false-positive rate of {cfg.target_fpr:g} per account-day"
    )
    benign = generate_traffic(
        TrafficConfig(benign_accounts=cfg.eval_accounts, pool="eval", seed=cfg.seed + 202)
    )
    benign_accounts = {r["account"] for r in benign}
    kinds, benign_flagged, scores = {}, set(), []
    for n, kind in enumerate(KINDS):
        spec = kind if kind in ("hydra", "slowlow") else f"{kind}:1:{cfg.campaign_requests}"
        camp = generate_traffic(
            TrafficConfig(benign_accounts=0, campaigns=(spec,), seed=cfg.seed + 300 + n)
        )
        records = benign + camp
        report = detect(
            records, cal, embedder=embedder, progress=progress(f"scoring {kind}", len(records))
        )
        rows = {r.account: r for r in report["results"]}
        attack = sorted({r["account"] for r in camp})
        caught = [rows[a] for a in attack if rows[a].flagged]
        benign_flagged |= {a for a in benign_accounts if rows[a].flagged}
        kinds[kind] = {
            "accounts": len(attack),
            "requests": len(camp),
            "flagged": len(caught),
            "median_requests_to_flag": _median([r.flagged_at_request for r in caught]),
            "reasons": rows[attack[0]].reasons[:3],
        }
        scores += [(kind, rows[a].score) for a in attack]
        if n == 0:
            scores += [("benign", rows[a].score) for a in sorted(benign_accounts)]
    result = {
        "calibration": {
            "accounts": cfg.cal_accounts,
            "requests": len(cal_records),
            "threshold": cal.threshold,
            "target_fpr": cfg.target_fpr,
        },
        "benign": {
            "accounts": len(benign_accounts),
            "requests": len(benign),
            "flagged": len(benign_flagged),
        },
        "campaigns": kinds,
    }
    result["plot"] = _plot_scores(scores, cal.threshold, cfg.out / "detection.png")
    return result


def _median(values: list[int]) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return float(values[mid]) if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _plot_scores(scores: list[tuple[str, float]], threshold: float, path: Path) -> str | None:
    try:
        import matplotlib
    except ImportError:  # plots are optional; the numbers are in the report
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["benign", *KINDS]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    rng = random.Random(0)
    for i, label in enumerate(labels):
        ys = [s for lab, s in scores if lab == label]
        ax.scatter(
            [i + rng.uniform(-0.2, 0.2) for _ in ys],
            ys,
            s=14,
            alpha=0.7,
            color="tab:green" if label == "benign" else "tab:red",
        )
    ax.axhline(threshold, color="grey", ls="--", lw=1, label=f"threshold {threshold:.1f}")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("account score")
    ax.set_title("distillguard demo: held-out benign users vs extraction campaigns")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# ---- act 3: trace the harvested data to accounts ---------------------------------------------


def act_trace(cfg: DemoConfig, live: dict) -> dict:
    """The distiller's data, each user's answers and text by another model, against every key."""
    from sqlalchemy import select

    from distillguard.data.sharegpt import first_turn_pairs
    from distillguard.guard.db import make_engine
    from distillguard.guard.schema import LedgerRow
    from distillguard.models import load_tokenizer
    from distillguard.watermark import WatermarkParams, account_key, trace
    from distillguard.watermark.detect import tokenize
    from distillguard.watermark.synthid import depth_weights

    master = (cfg.out / "watermark.secret").read_text().strip().encode()
    params = WatermarkParams(scheme="synthid")  # what `serve` uses by default
    accounts = list(live["ledger"])
    keys = [account_key(master, name, params) for name in accounts]
    tok = load_tokenizer(cfg.model)

    def test(texts: list[str], prompts: list[str]) -> dict:
        answers = tokenize(tok, texts)
        weights = [depth_weights(len(a), params.synthid.depth) for a in answers]
        result = trace(
            keys, answers, prompt_seqs=tokenize(tok, prompts), vocab_size=len(tok), weights=weights
        )
        per_key = {r.account: round(r.log10_p, 2) for r in result.results}
        return {"texts": len(texts), "traced": result.accounts, "log10_p": per_key}

    from distillguard.distill.store import ResponseStore

    data = read_jsonl(cfg.out / "harvest" / "data.jsonl")
    out = {
        "distiller_data": test(
            [d["response"] for d in data], [d["messages"][-1]["content"] for d in data]
        )
    }
    # every answer it paid for, the ones capped at max_tokens too (the dataset keeps finished ones only)
    store = ResponseStore(cfg.out / "harvest" / "store.sqlite")
    try:
        received = [
            (rec["request"]["messages"][-1]["content"], choice["message"]["content"])
            for rec in store.records(only_ok=False)
            if isinstance(rec["response"], dict)
            for choice in rec["response"].get("choices") or []
            if isinstance(choice, dict) and (choice.get("message") or {}).get("content")
        ]
    finally:
        store.close()
    out["distiller_received"] = test([a for _, a in received], [p for p, _ in received])
    engine = make_engine(f"sqlite:///{cfg.out / 'ledger.db'}")
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(LedgerRow.account_id, LedgerRow.response_text, LedgerRow.request_body).where(
                    LedgerRow.status == 200
                )
            ).all()
    finally:
        engine.dispose()
    out["users"] = {}
    for name in accounts[1:]:
        mine = [r for r in rows if r.account_id == name and r.response_text]
        if mine:
            asked = [
                (r.request_body or {}).get("messages", [{}])[-1].get("content", "") for r in mine
            ]
            out["users"][name] = test([r.response_text for r in mine], asked)
    pairs = first_turn_pairs(len(data) or 32)
    out["other_model"] = test([a for _, a in pairs], [p for p, _ in pairs])
    return out


# ---- act 4: a student trained on the data, tested for the canaries ---------------------------


def act_student(cfg: DemoConfig, say: Say, train_callbacks=()) -> dict:
    from distillguard.distill.curate import CurateConfig, curate, save_dataset
    from distillguard.distill.train import TrainConfig, load_student, train
    from distillguard.forensics.canaries import canary_test, served_canaries
    from distillguard.guard.db import make_engine
    from distillguard.models import load_model

    engine = make_engine(f"sqlite:///{cfg.out / 'ledger.db'}")
    try:
        served = served_canaries(engine)
    finally:
        engine.dispose()
    if not served:
        return {"skipped": "no canaries were served (the distiller never reached 'extracting')"}
    rows, _, creport = curate(
        read_jsonl(cfg.out / "harvest" / "data.jsonl"), CurateConfig(eval_fraction=0.0)
    )
    data_dir, student_dir = cfg.out / "curated", cfg.out / "student"
    for stale in (data_dir, student_dir):  # a rerun trains on its own harvest, from scratch
        shutil.rmtree(stale, ignore_errors=True)
    save_dataset(rows, [], data_dir)
    say(
        f"training {cfg.student} on {len(rows)} curated answers of the distiller "
        f"({sum(1 for c in served if c.account == DISTILLER)} of them canaries) ..."
    )
    summary = train(
        TrainConfig(
            data=str(data_dir),
            out=str(student_dir),
            student=cfg.student,
            teacher=cfg.model,
            loss="sft",
            epochs=cfg.epochs,
            lr=5e-4,
            batch_size=4,
            seed=cfg.seed,
            unlikelihood=0.0,
        ),  # a canary carrier, not a good student: plain SFT
        callbacks=train_callbacks,
    )
    master = (cfg.out / "watermark.secret").read_text().strip().encode()
    result = {
        "curated_rows": len(rows),
        "curate": creport.to_dict(),
        "train": {k: summary.get(k) for k in ("steps", "final_loss", "train_seconds")},
    }
    for name, lm in (
        ("student", load_model(str(student_dir))),
        ("untrained_student", load_student(cfg.student, cfg.model)),
    ):
        test = canary_test(lm, master, served, decoys=CANARY_DECOYS, seed=cfg.seed)
        result[name] = {
            "traced": test.traced,
            "accounts": [asdict(a) for a in test.accounts],
            # a "not traced" with the test's power at that many canaries
            "power": test.to_dict()["power"],
        }
    return result


# ---- the whole scenario ------------------------------------------------------------------------


@dataclass
class DemoHooks:
    """How the caller shows progress (the CLI: rich); the defaults print nothing."""

    say: Say = lambda text: None
    progress: Callable[[str, int], Callable[[int], None]] = lambda label, total: lambda k: None
    harvest_progress: Callable | None = None
    train_callbacks: tuple = field(default_factory=tuple)


# What each act's result depends on: these settings and the act before it (the rest of the
# config, out/threads/startup_timeout_s, changes where or how fast, not what). A rerun in the
# same OUT reuses an act whose key and files are still there; --fresh redoes every act.
STAGES: dict[str, tuple[str | None, tuple[str, ...], tuple[str, ...]]] = {
    # act: (the act it builds on, its settings, the files it leaves that later acts read)
    "detection": (
        None,
        ("cal_accounts", "eval_accounts", "campaign_requests", "target_fpr", "seed"),
        ("calibration.npz",),
    ),
    "live": (
        "detection",
        (
            "model", "users", "user_requests", "extract", "max_tokens", "extracting_after",
            "concurrency", "max_prompt_chars", "seed",
        ),
        ("ledger.db", "watermark.secret", "harvest/data.jsonl", "harvest/store.sqlite"),
    ),
    "trace": ("live", (), ()),
    "student": ("live", ("student", "epochs", "seed"), ("student/config.json",)),
    "forensics": ("student", (), ("forensics/evidence.json", "forensics/api/evidence.json")),
    "quality": ("student", ("quality_prompts",), ()),
}  # fmt: skip


def stage_keys(cfg: DemoConfig) -> dict[str, str]:
    """Each act's cache key: a hash of its settings, the keys of the acts it builds on and the
    package version (a code change within one version needs --fresh)."""
    from distillguard import __version__

    keys: dict[str, str] = {}
    for name, (after, settings, _) in STAGES.items():
        material = {
            "act": name,
            "after": keys.get(after) if after else None,
            "settings": {k: getattr(cfg, k) for k in settings},
            "version": __version__,
        }
        keys[name] = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
    return keys


class _Stages:
    """``OUT/stages.json``: each finished act's key, result and seconds, written as it ends."""

    def __init__(self, cfg: DemoConfig, fresh: bool):
        self.path = cfg.out / "stages.json"
        self.out = cfg.out
        self.keys = stage_keys(cfg)
        self.saved: dict = {}
        self.redone: set[str] = set()
        if not fresh and self.path.is_file():
            try:
                self.saved = json.loads(self.path.read_text())
            except ValueError:  # a file cut short: redo the acts
                self.saved = {}

    def cached(self, name: str) -> dict | None:
        entry = self.saved.get(name)
        if not isinstance(entry, dict) or entry.get("key") != self.keys[name]:
            return None
        if STAGES[name][0] in self.redone:  # its input was made again (its files were gone)
            return None
        files = STAGES[name][2]
        if "skipped" in entry["result"]:
            files = ()  # no student was trained: nothing to find
        if not all((self.out / f).exists() for f in files):
            return None
        return entry

    def run(self, name: str, act: Callable[[], dict], say: Say) -> tuple[dict, float]:
        entry = self.cached(name)
        if entry is not None:
            say(f"   reused from the earlier run in {self.out} (same settings; --fresh redoes it)")
            return entry["result"], entry["seconds"]
        self.redone.add(name)
        started = time.perf_counter()
        result = act()
        seconds = time.perf_counter() - started
        self.saved[name] = {"key": self.keys[name], "result": result, "seconds": seconds}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.saved, indent=2, default=str) + "\n")
        tmp.replace(self.path)
        return result, seconds


def run_demo(cfg: DemoConfig, hooks: DemoHooks | None = None, *, fresh: bool = False) -> dict:
    """Play the acts; the report is returned and written to ``OUT/demo.json``, with
    ``OUT/report.html`` beside it. Acts finished by an earlier run in ``OUT`` with the same
    settings are reused unless ``fresh``; ``seconds`` is the acts' own time, reused or not.
    Logging is the caller's (the CLI keeps other libraries quiet unless -v)."""
    from distillguard.arena.demo_report import write_report

    hooks = hooks or DemoHooks()
    cfg.out.mkdir(parents=True, exist_ok=True)
    stages = _Stages(cfg, fresh)
    seconds = 0.0
    report: dict = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    }
    acts = [
        ("detection", "1. detection on labelled arena traffic",
         lambda: act_detection(cfg, hooks.say, hooks.progress)),
        ("live", "2. live: the gateway, a distiller and benign users",
         lambda: act_live(cfg, hooks.say, hooks.harvest_progress)),
        ("trace", "3. tracing the harvested data to accounts",
         lambda: act_trace(cfg, report["live"])),
    ]  # fmt: skip
    if cfg.student:
        acts.append(
            ("student", "4. the suspect model: canaries",
             lambda: act_student(cfg, hooks.say, hooks.train_callbacks))
        )  # fmt: skip
        acts.append(
            ("forensics", "4. the suspect model: the forensics report, on its weights and its URL",
             lambda: {"skipped": report["student"]["skipped"]} if "skipped" in report["student"]
             else act_forensics(cfg, hooks.say))
        )  # fmt: skip
        if cfg.quality_prompts:
            acts.append(
                ("quality", "5. what the student learned: held-out prompts",
                 lambda: {"skipped": report["student"]["skipped"]} if "skipped" in report["student"]
                 else act_quality(cfg, hooks.say))
            )  # fmt: skip
    for name, title, act in acts:
        hooks.say(f"[bold]{title}[/]")
        report[name], took = stages.run(name, act, hooks.say)
        seconds += took
    report["seconds"] = round(seconds, 1)
    (cfg.out / "demo.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    write_report(report, cfg.out)
    return report
