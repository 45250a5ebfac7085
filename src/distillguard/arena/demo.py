"""``distillguard demo``: the arena's default scenario, provider against distiller against investigator.

Four acts on one machine, every part real (the gateway is ``distillguard serve`` in a subprocess
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
   (exact rank p-values, Fisher per account, Holm), against the untrained student as control.

:func:`run_demo` returns the report (also written to ``OUT/demo.json``); the CLI prints it.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from distillguard.errors import ConfigError
from distillguard.watermark.secret import write_secret

KINDS = ("bulk", "template", "reasoning", "logprobs", "hydra", "slowlow")
DISTILLER = "distiller"
# The demo's policy ladder: graduated, and without 'block' so the distiller keeps harvesting
# and the later acts have poisoned data to find (a real provider may well block instead).
POLICY = {
    "ladder": {
        "watch": ["log"],
        "suspect": ["log", "limit_logprobs", "watermark_boost"],
        "extracting": ["log", "limit_logprobs", "watermark_boost", "canary"],
    },
    "logprobs_cap": 0,
    "canary_rate": 0.25,
}

Say = Callable[[str], None]


@dataclass(frozen=True)
class DemoConfig:
    out: Path
    model: str = "smollm2"
    # act 1
    cal_accounts: int = 80
    eval_accounts: int = 40
    campaign_requests: int = 300
    target_fpr: float = 0.01
    # act 2
    users: int = 6
    user_requests: int = 3
    extract: int = 96
    max_tokens: int = (
        128  # at 64 most SmolLM2 answers are capped, and the dataset keeps finished ones
    )
    extracting_after: int = 10
    concurrency: int = 4
    threads: int = 0
    max_prompt_chars: int = (
        600  # live prompts longer than this are skipped (a small model's context)
    )
    # act 4
    student: str | None = "prune:8"
    epochs: float = 6.0  # enough passes over ~30 rows for the student to take in the canaries
    seed: int = 0
    startup_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.cal_accounts < 20 or self.eval_accounts < 1:
            raise ConfigError(
                "--cal-accounts must be at least 20 (the calibration splits them three ways) "
                "and --eval-accounts at least 1"
            )
        if (
            min(
                self.users,
                self.user_requests,
                self.extract,
                self.max_tokens,
                self.extracting_after,
                self.campaign_requests,
                self.concurrency,
                self.max_prompt_chars,
            )
            < 1
        ):
            raise ConfigError(
                "--users, --user-requests, --extract, --max-tokens, --extracting-after, "
                "--campaign-requests, --concurrency and --max-prompt-chars must be at least 1"
            )
        if not 0 < self.target_fpr < 1:
            raise ConfigError(f"--target-fpr {self.target_fpr} must be between 0 and 1")
        if self.epochs <= 0:
            raise ConfigError(f"--epochs {self.epochs} must be above 0")


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


# ---- act 2: the live gateway, a distiller and benign users ----------------------------------


@contextmanager
def gateway(cfg: DemoConfig, env: dict[str, str]) -> Iterator[str]:
    """``distillguard serve`` on a free loopback port; yields its base URL once /healthz answers."""
    from distillguard.serve.process import serve_subprocess

    with serve_subprocess(
        "--model",
        cfg.model,
        "--db",
        f"sqlite:///{cfg.out / 'ledger.db'}",
        "--detect",
        str(cfg.out / "calibration.npz"),
        "--policy",
        str(cfg.out / "policy.yaml"),
        "--extracting-after",
        str(cfg.extracting_after),
        "--threads",
        str(cfg.threads),
        log_path=cfg.out / "server.log",
        env=env,
        timeout_s=cfg.startup_timeout_s,
        poll_s=0.2,
    ) as server:
        yield server.url


async def _user(
    client, model: str, prompts: list[str], max_tokens: int, rng: random.Random
) -> list[int | str]:
    """A person: a few questions, reading each answer before the next (think time of seconds)."""
    from openai import APIStatusError, APITimeoutError

    statuses: list[int | str] = []
    for prompt in prompts:
        await asyncio.sleep(rng.uniform(1.0, 4.0))
        try:
            await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=max_tokens,
                temperature=0.7,
            )
            statuses.append(200)
        except APIStatusError as exc:
            statuses.append(exc.status_code)
        except APITimeoutError:  # a machine too busy to answer within the client's timeout:
            statuses.append("timeout")  # the user gave up, as the report says; the demo goes on
    return statuses


async def _live_traffic(
    cfg: DemoConfig, url: str, keys: dict[str, str], model: str, on_progress
) -> dict:
    from openai import AsyncOpenAI

    from distillguard.distill.harvest import HarvestConfig, harvest
    from distillguard.distill.prompts import load_prompts
    from distillguard.distill.store import ResponseStore

    extract = load_prompts("sharegpt", limit=cfg.extract, max_chars=cfg.max_prompt_chars)
    asked = load_prompts(
        "sharegpt", skip=5000, limit=cfg.users * cfg.user_requests, max_chars=cfg.max_prompt_chars
    )
    hcfg = HarvestConfig(
        teacher=url,
        api_key=keys[DISTILLER],
        model=model,
        max_tokens=cfg.max_tokens,
        temperature=0.7,
        top_logprobs=5,
        concurrency=cfg.concurrency,
        max_retries=2,
        timeout_s=600.0,
    )
    hdir = cfg.out / "harvest"
    store = ResponseStore(hdir / "store.sqlite")
    rng = random.Random(cfg.seed)
    users = [name for name in keys if name != DISTILLER]
    clients = [
        AsyncOpenAI(base_url=url + "/v1", api_key=keys[u], max_retries=0, timeout=600.0)
        for u in users
    ]
    try:
        tasks = [
            _user(
                c,
                model,
                [p.messages[-1][1] for p in asked[i :: len(users)]],
                cfg.max_tokens,
                random.Random(rng.random()),
            )
            for i, c in enumerate(clients)
        ]
        report, *user_statuses = await asyncio.gather(
            harvest(hcfg, extract, store, on_progress=on_progress), *tasks
        )
    finally:
        for c in clients:
            await c.close()
    rows = store.export_jsonl(hdir / "data.jsonl")
    store.close()
    return {
        "harvest": {**report.to_dict(), "data_rows": rows},
        "users": {u: dict(Counter(s)) for u, s in zip(users, user_statuses)},
    }


def act_live(cfg: DemoConfig, say: Say, on_harvest_progress=None) -> dict:
    """Serve the teacher behind the guard; a distiller and benign users call it; read the ledger."""
    import httpx

    for stale in (
        "ledger.db",
        "ledger.db-wal",
        "ledger.db-shm",
    ):  # every run starts from an empty ledger
        (cfg.out / stale).unlink(missing_ok=True)
    shutil.rmtree(cfg.out / "harvest", ignore_errors=True)
    (cfg.out / "harvest").mkdir()
    (cfg.out / "policy.yaml").write_text(json.dumps(POLICY, indent=2) + "\n")  # JSON is YAML
    secret = secrets.token_hex(32)
    write_secret(
        cfg.out / "watermark.secret", secret
    )  # 0600: whoever reads it can trace and forge watermarks
    admin = "admin-" + secrets.token_hex(16)
    env = {"DISTILLGUARD_WATERMARK_SECRET": secret, "DISTILLGUARD_ADMIN_KEY": admin}
    accounts = [DISTILLER] + [f"user-{i + 1}" for i in range(cfg.users)]
    with gateway(cfg, env) as url:
        with httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=60
        ) as http:
            keys = {}
            for name in accounts:
                resp = http.post("/admin/keys", json={"account": name})
                resp.raise_for_status()
                keys[name] = resp.json()["key"]
            models = http.get(
                "/v1/models", headers={"Authorization": f"Bearer {keys[DISTILLER]}"}
            ).json()
            model = models["data"][0]["id"]
            say(
                f"gateway on {url} serving {model!r}: {cfg.extract} requests from the distiller, "
                f"{cfg.user_requests} each from {cfg.users} users"
            )
            traffic = asyncio.run(_live_traffic(cfg, url, keys, model, on_harvest_progress))
            verdicts = http.get("/admin/verdicts").json()
    traffic["ledger"] = _ledger_summary(cfg.out / "ledger.db", accounts)
    traffic["verdicts"] = verdicts
    traffic["model"] = model
    return traffic


def _ledger_summary(db: Path, accounts: list[str]) -> dict:
    """Per account, from the ledger alone: requests, statuses, and when each countermeasure began."""
    from sqlalchemy import select

    from distillguard.guard.db import make_engine
    from distillguard.guard.schema import LedgerRow

    engine = make_engine(f"sqlite:///{db}")
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(LedgerRow.account_id, LedgerRow.status, LedgerRow.policy_action).order_by(
                    LedgerRow.ts, LedgerRow.id
                )
            ).all()
    finally:
        engine.dispose()
    out = {}
    for name in accounts:
        mine = [r for r in rows if r.account_id == name]
        entry: dict = {"requests": len(mine), "statuses": dict(Counter(r.status for r in mine))}
        for what, test in (
            ("suspect", lambda a: a.startswith("suspect")),
            ("extracting", lambda a: a.startswith("extracting")),
            ("canary", lambda a: "canary" in a),
        ):
            hits = [i for i, r in enumerate(mine, 1) if r.policy_action and test(r.policy_action)]
            entry[f"{what}_from_request"] = hits[0] if hits else None
            entry[f"{what}_requests"] = len(hits)
        out[name] = entry
    return out


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

    data = [
        json.loads(line)
        for line in (cfg.out / "harvest" / "data.jsonl").read_text().splitlines()
        if line
    ]
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
    from distillguard.distill.curate import CurateConfig, curate, read_jsonl, save_dataset
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
        test = canary_test(lm, master, served, decoys=49, seed=cfg.seed)
        result[name] = {"traced": test.traced, "accounts": [asdict(a) for a in test.accounts]}
    return result


# ---- the whole scenario ------------------------------------------------------------------------


@dataclass
class DemoHooks:
    """How the caller shows progress (the CLI: rich); the defaults print nothing."""

    say: Say = lambda text: None
    progress: Callable[[str, int], Callable[[int], None]] = lambda label, total: lambda k: None
    harvest_progress: Callable | None = None
    train_callbacks: tuple = field(default_factory=tuple)


def run_demo(cfg: DemoConfig, hooks: DemoHooks | None = None) -> dict:
    """Play the four acts; the report is returned and written to ``OUT/demo.json``. Logging is
    the caller's (the CLI keeps other libraries quiet unless -v)."""
    hooks = hooks or DemoHooks()
    cfg.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    }
    hooks.say("[bold]1. detection on labelled arena traffic[/]")
    report["detection"] = act_detection(cfg, hooks.say, hooks.progress)
    hooks.say("[bold]2. live: the gateway, a distiller and benign users[/]")
    report["live"] = act_live(cfg, hooks.say, hooks.harvest_progress)
    hooks.say("[bold]3. tracing the harvested data to accounts[/]")
    report["trace"] = act_trace(cfg, report["live"])
    if cfg.student:
        hooks.say("[bold]4. the suspect model: canaries[/]")
        report["student"] = act_student(cfg, hooks.say, hooks.train_callbacks)
    report["seconds"] = round(time.perf_counter() - started, 1)
    (cfg.out / "demo.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report
