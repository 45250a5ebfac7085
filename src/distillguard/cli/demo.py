"""``distillguard demo``: the arena's default scenario on the embedded defaults."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
from pathlib import Path

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from distillguard.cli.common import (
    configure_logging,
    console,
    err_console,
    make_progress,
    verbose_option,
)


class _Extra(ProgressColumn):
    """A task's tokens so far (harvest) or latest loss (training), whichever it has."""

    def render(self, task) -> Text:
        if "loss" in task.fields:
            return Text(f"loss {task.fields['loss']}")
        return Text(str(task.fields.get("extra", "")))


def demo_command(
    out: Path = typer.Option(
        Path("distillguard-demo"),
        "--out",
        "-o",
        help="directory for the ledger, harvest, calibration, student, demo.json and report.html; "
        "a rerun in it reuses each act an earlier run finished with the same settings",
    ),
    model: str = typer.Option(
        "smollm2", "--model", "-m", help="teacher: smollm2 | tiny | HF id | DIR | FILE.gguf"
    ),
    cal_accounts: int = typer.Option(80, help="benign users the detectors are calibrated on"),
    eval_accounts: int = typer.Option(40, help="held-out benign users mixed with each campaign"),
    campaign_requests: int = typer.Option(300, help="requests per one-account campaign"),
    target_fpr: float = typer.Option(
        0.01, help="false-positive rate per benign account-day to calibrate to"
    ),
    users: int = typer.Option(6, help="benign users calling the live gateway"),
    user_requests: int = typer.Option(3, help="questions each of them asks"),
    extract: int = typer.Option(96, help="requests the distiller sends"),
    max_tokens: int = typer.Option(128, help="answer length cap of every live request"),
    extracting_after: int = typer.Option(
        10, help="flagged requests before the distiller is 'extracting' (canaries from then on)"
    ),
    concurrency: int = typer.Option(4, help="the distiller's requests in flight"),
    threads: int = typer.Option(0, help="the gateway's torch CPU threads (0: one per core)"),
    max_prompt_chars: int = typer.Option(600, help="live prompts longer than this are skipped"),
    student: str = typer.Option(
        "prune:8",
        help="student trained on the harvest for act 4 (model spec, prune:K); 'none' skips act 4",
    ),
    epochs: float = typer.Option(6.0, help="the student's training epochs"),
    quality_prompts: int = typer.Option(
        8,
        help="held-out prompts (none sent by any account) the student and the untrained student "
        "are scored on against the teacher; 0 skips act 5",
    ),
    seed: int = typer.Option(0, help="random seed of the traffic and the training"),
    fresh: bool = typer.Option(
        False, "--fresh", help="redo every act, even those an earlier run in --out finished"
    ),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    verbose: bool = verbose_option(),
) -> None:
    """Play provider, distiller and investigator against each other and report the numbers.

    1: detectors calibrated on benign arena users score held-out users and one campaign of each kind.

    2: the teacher is served behind the guard (watermark, online detection, a graduated policy); a
    distiller harvests it while benign users ask questions.

    3: the harvested data is traced by its watermark to the account that took it.

    4: a student trained on it is tested for the canaries served to the distiller, then judged by the
    forensics report (the untrained student as control) on its weights and, served with --no-guard,
    through its API.

    5: the student and the untrained student are scored against the teacher on held-out prompts.

    Ground truth is known throughout, and each test has its control. About 20 minutes on 2 cores with the
    embedded teacher. OUT/report.html shows it all (plots embedded, opens offline); a rerun in the same
    --out reuses the acts it already finished with the same settings (--fresh: redo them).

    Examples:

      distillguard demo

      distillguard demo --model tiny --student prune:1 --max-tokens 32 --max-prompt-chars 200 -o /tmp/demo

      distillguard demo --student none --json > demo.json      # acts 1-3 only
    """
    from distillguard.arena.demo import DemoConfig, DemoHooks, run_demo
    from distillguard.distill.train import ProgressCallback

    cfg = DemoConfig(
        out=out,
        model=model,
        cal_accounts=cal_accounts,
        eval_accounts=eval_accounts,
        campaign_requests=campaign_requests,
        target_fpr=target_fpr,
        users=users,
        user_requests=user_requests,
        extract=extract,
        max_tokens=max_tokens,
        extracting_after=extracting_after,
        concurrency=concurrency,
        threads=threads,
        max_prompt_chars=max_prompt_chars,
        student=None if student.lower() == "none" else student,
        epochs=epochs,
        quality_prompts=quality_prompts,
        seed=seed,
    )
    progress = make_progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        _Extra(),
        transient=True,
    )

    def bar(label: str, total: int):
        task = progress.add_task(label, total=total, extra="")
        return lambda k: progress.advance(task, k)

    harvest_task = None

    def on_harvest(report, budget) -> None:
        nonlocal harvest_task
        if harvest_task is None:
            harvest_task = progress.add_task("distiller harvesting", total=report.planned, extra="")
        progress.update(
            harvest_task, completed=report.finished(), extra=f"{report.completion_tokens} tokens"
        )

    train_progress = ProgressCallback(progress, "training the student")
    hooks = DemoHooks(
        say=lambda text: progress.console.print(text),
        progress=bar,
        harvest_progress=on_harvest,
        train_callbacks=(train_progress,),
    )
    if verbose:
        configure_logging(True)
    verbose = verbose or logging.getLogger().isEnabledFor(logging.DEBUG)  # `distillguard -v demo`
    # The Trainer print()s every log dict ({'loss': ...}) to stdout (train() turns its tqdm off,
    # so it adds its PrinterCallback): stdout is the report's (--json's JSON), the loss is in the
    # training bar, and -v shows the dicts on stderr.
    with progress, contextlib.redirect_stdout(sys.stderr if verbose else io.StringIO()):
        report = run_demo(cfg, hooks, fresh=fresh)
    if as_json:
        print(json.dumps(report, default=str))
        return
    show(report)
    err_console.print(
        f"report: {out / 'report.html'} (numbers: {out / 'demo.json'}); ledger: "
        f"{out / 'ledger.db'} ({report['seconds']:.0f} s)"
    )


def _p(log10_p: float | None) -> str:
    return "-" if log10_p is None else f"1e{log10_p:.0f}" if log10_p < -3 else f"{10**log10_p:.2g}"


def show(report: dict) -> None:
    det = report["detection"]
    table = Table(
        title=f"1. detection (calibrated on {det['calibration']['accounts']} benign users, target FPR "
        f"{det['calibration']['target_fpr']:g} per account-day)"
    )
    for col in ("traffic", "accounts", "flagged", "median requests to flag"):
        table.add_column(col, justify="left" if col == "traffic" else "right")
    table.add_row(
        "held-out benign users", str(det["benign"]["accounts"]), str(det["benign"]["flagged"]), "-"
    )
    for kind, k in det["campaigns"].items():
        table.add_row(
            f"campaign {kind}",
            str(k["accounts"]),
            str(k["flagged"]),
            "-" if k["median_requests_to_flag"] is None else f"{k['median_requests_to_flag']:.0f}",
        )
    console.print(table)

    live = report["live"]
    table = Table(title="2. live gateway: what the ledger says")
    for col in ("account", "requests", "statuses", "suspect from", "extracting from", "canaries"):
        table.add_column(col, justify="left" if col in ("account", "statuses") else "right")
    for name, e in live["ledger"].items():
        table.add_row(
            name,
            str(e["requests"]),
            ", ".join(f"{s}: {n}" for s, n in sorted(e["statuses"].items())),
            str(e["suspect_from_request"] or "-"),
            str(e["extracting_from_request"] or "-"),
            str(e["canary_requests"]),
        )
    console.print(table)
    h = live["harvest"]
    console.print(
        f"distiller: {h['stored_ok']} answers stored, {h['data_rows']} usable rows, "
        f"{h['completion_tokens']} completion tokens in {h['seconds']:.0f} s; failed {h['failed'] or 0}"
    )

    tr = report["trace"]
    table = Table(title="3. whose watermark is in the text (exact p-values, Holm over accounts)")
    for col in ("texts", "n", "traced to", "p (distiller's key)"):
        table.add_column(col, justify="right" if col == "n" else "left")
    rows = [
        ("the distiller's dataset (finished answers)", tr["distiller_data"]),
        ("every answer the distiller received", tr["distiller_received"]),
    ]
    rows += [(f"{name}'s answers", t) for name, t in tr["users"].items()]
    rows.append(("ShareGPT answers by another model", tr["other_model"]))
    for label, t in rows:
        table.add_row(
            label,
            str(t["texts"]),
            ", ".join(t["traced"]) or "nobody",
            _p(t["log10_p"].get("distiller")),
        )
    console.print(table)

    st = report.get("student")
    if st is None:
        return
    if "skipped" in st:
        console.print(f"4. student: skipped, {st['skipped']}")
        return
    table = Table(
        title=f"4. canaries in the suspect model ({st['curated_rows']} training rows, "
        f"{st['train']['steps']} steps)"
    )
    for col in (
        "model",
        "account",
        "canaries",
        "ranked first",
        "mean rank (of 50)",
        "p (Holm)",
        "traced",
    ):
        table.add_column(col)
    for name in ("student", "untrained_student"):
        for a in st[name]["accounts"]:
            table.add_row(
                name.replace("_", " "),
                a["account"],
                str(a["canaries"]),
                str(a["top1"]),
                f"{a['mean_rank']:.1f}",
                f"{a['p_holm']:.1e}",
                "yes" if a["account"] in st[name]["traced"] else "no",
            )
    console.print(table)
    f = report.get("forensics")
    if f and "skipped" not in f:
        combined = "-" if f["combined_p"] is None else f"{f['combined_p']:.1e}"
        console.print(
            f"4. forensics report (the untrained student as control): [bold]{f['verdict']}[/] "
            f"(combined p {combined}), traced to {', '.join(f['traced']) or 'nobody'}; "
            + ", ".join(
                f"{name} p {t['p_holm']:.1e}" if t["ran"] else f"{name} could not run"
                for name, t in f["tests"].items()
            )
        )
        api = f["api_canaries"]
        if api["ran"]:
            console.print(
                f"   by its API alone ({api['student']['scoring']}): canaries traced to "
                f"{', '.join(api['student']['traced']) or 'nobody'}; the untrained student's to "
                f"{', '.join(api['untrained_student']['traced']) or 'nobody'}"
            )
        else:
            console.print(f"   the API-only canary test could not run: {api['why_not']}")
    q = report.get("quality")
    if q and "skipped" not in q:
        console.print(
            f"5. on {q['prompts']} held-out prompts, NLL of the teacher's answers (nats/token; "
            f"the teacher's own {q['teacher']['nll']:.2f}): student {q['student']['nll']:.2f}, "
            f"untrained {q['untrained_student']['nll']:.2f}; ROUGE-L vs the teacher: "
            f"{q['student']['rouge_l']:.2f} and {q['untrained_student']['rouge_l']:.2f}"
        )
