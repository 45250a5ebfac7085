"""``distillguard detect``: score a traffic log or the ledger for extraction, per account."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from distillguard.cli.common import DB_HELP, console, err_console, make_progress
from distillguard.cli.options import option
from distillguard.detect.config import DetectConfig
from distillguard.errors import ConfigError


def read_records(path: str) -> list[dict]:
    """Traffic-log records from a JSONL or Parquet file (- for JSONL on stdin); a bad line or row
    is a one-line error naming it."""
    from distillguard.detect import parquet
    from distillguard.guard.ledger import read_traffic

    if path == "-":
        return [r for _, r in read_traffic(sys.stdin.buffer, source="<stdin>")]
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"no such traffic file: {path}")
    if parquet.is_parquet(p):
        return list(parquet.read_traffic(p))
    with open(p, "rb") as fh:  # split at b"\n" only: see distillguard.jsonl
        return [r for _, r in read_traffic(fh, source=str(p))]


def ledger_records(db: str) -> list[dict]:
    """The ledger as traffic records, as its export writes them (without a JSON round trip, which
    split a record at a U+2028 inside a prompt)."""
    from distillguard.guard.db import make_engine, migrate
    from distillguard.guard.ledger import iter_traffic

    engine = make_engine(db)
    migrate(engine)
    try:
        return list(iter_traffic(engine))
    finally:
        engine.dispose()


TEXT_DETECTORS = "template, cot, mmd, prada and coverage"


def warn_without_text(records: list[dict], what: str) -> None:
    """Say how many requests the text detectors cannot read (a ledger kept as hashes or lengths)."""
    from distillguard.detect.features import without_text

    n = sum(map(without_text, records))
    if n:
        err_console.print(
            f"[yellow]warning:[/] {n} of {len(records)} {what} carry no prompt text (a ledger kept "
            f"with --ledger-content hashes or off): {TEXT_DETECTORS} learn nothing from them, "
            "linking sees only identical prompts (hashes); volume, timing, shape and fresh "
            "are unaffected. Calibrate on traffic kept the same way: a calibration made on text "
            "sets the threshold too high for it (bench/ledger_privacy.py)"
        )


def _progress(label: str, total: int):
    prog = make_progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True
    )
    task = prog.add_task(label, total=total)
    return prog, lambda k: prog.advance(task, k)


def detect_command(
    traffic: str | None = typer.Option(
        None,
        "--traffic",
        "-t",
        help="traffic log to score: JSONL or Parquet (- for JSONL on stdin)",
    ),
    ledger: str | None = typer.Option(
        None, "--ledger", help="score the ledger instead; " + DB_HELP
    ),
    calibrate_file: str | None = typer.Option(
        None,
        "--calibrate",
        help="benign traffic (JSONL or Parquet) to calibrate on (benign accounts only)",
    ),
    calibration: str | None = typer.Option(
        None, "--calibration", "-c", help="a saved calibration (.npz) to use"
    ),
    save_calibration: str | None = typer.Option(
        None,
        "--save-calibration",
        help="write the calibration made by --calibrate here (the gateway loads it)",
    ),
    target_fpr: float = option(DetectConfig, "target_fpr"),
    # a comma-separated string where the config holds a tuple: not given means the config's ()
    detectors: str | None = typer.Option(
        None,
        help="comma-separated detectors to calibrate with (default: all "
        "registered: volume,timing,shape,template,cot,mmd,prada,coverage,fresh,linking)",
    ),
    as_json: bool = typer.Option(False, "--json", help="print the detection report as JSON"),
    plot: str | None = typer.Option(
        None, "--plot", help="save a plot of account scores vs the threshold (PNG)"
    ),
    top: int = typer.Option(30, help="rows of the table (most suspicious first)"),
) -> None:
    """Find the accounts that are extracting the model: per account a calibrated score, a flag,
    the request at which it was first flagged, reasons and its cluster of linked accounts.

    Calibrate on benign traffic (--calibrate) or load a calibration (--calibration).

    Examples:

      distillguard detect --traffic eval.jsonl --calibrate benign.jsonl --save-calibration cal.npz

      distillguard detect --ledger ledger.db --calibration cal.npz --json > report.json
    """
    from distillguard.detect import Calibration, calibrate, detect

    if (traffic is None) == (ledger is None):
        raise ConfigError("give exactly one of --traffic FILE.jsonl or --ledger DBURL")
    if (calibrate_file is None) == (calibration is None):
        raise ConfigError("give exactly one of --calibrate BENIGN.jsonl or --calibration FILE.npz")
    records = read_records(traffic) if traffic is not None else ledger_records(ledger)
    if not records:
        raise ConfigError("no requests to score")
    warn_without_text(records, "requests to score")
    if calibrate_file is not None:
        benign = read_records(calibrate_file)
        warn_without_text(benign, "calibration requests")
        prog, step = _progress("calibrating", len(benign) * 2)
        with prog:
            names = tuple(n.strip() for n in detectors.split(",") if n.strip()) if detectors else ()
            cal = calibrate(
                benign, config=DetectConfig(target_fpr=target_fpr, detectors=names), progress=step
            )
        if cal.stats.get("size_message"):  # too few held-out accounts to show the target
            err_console.print(f"[yellow]warning:[/] {cal.stats['size_message']}")
        if save_calibration:
            cal.save(save_calibration)
            err_console.print(f"calibration saved to {save_calibration}")
    else:
        cal = Calibration.load(calibration)
        if detectors:
            raise ConfigError(
                "--detectors applies to --calibrate; a saved calibration fixes its detectors"
            )
        given = target_fpr != DetectConfig.model_fields["target_fpr"].default
        if given and abs(target_fpr - cal.target_fpr) > 1e-12:
            raise ConfigError(
                f"--target-fpr {target_fpr} differs from the calibration's {cal.target_fpr}; "
                "recalibrate with --calibrate to change it"
            )
    prog, step = _progress("scoring", len(records))
    with prog:
        report = detect(records, cal, progress=step)
    results = report.pop("results")
    if plot:
        _plot(results, cal.threshold, plot)
    if as_json:
        console.print_json(json.dumps(report))
        return
    s = cal.stats
    table = Table(
        title=f"detection: threshold {cal.threshold:.1f} at target FPR {cal.target_fpr:g} per account-day "
        f"(held-out benign FPR {s.get('heldout_flagged_days', '?')}/{s.get('heldout_account_days', '?')})"
    )
    for col in ("account", "score", "flagged at", "requests", "cluster", "reasons"):
        table.add_column(col, overflow="fold")
    for r in results[:top]:
        table.add_row(
            r.account,
            f"{r.score:.1f}",
            "[red]" + str(r.flagged_at_request) if r.flagged else "-",
            str(r.requests),
            r.cluster or "",
            "\n".join(r.reasons[:3]),
        )
    console.print(table)
    console.print(f"{sum(r.flagged for r in results)} of {len(results)} accounts flagged")


def _plot(results, threshold: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = sorted((r.score for r in results), reverse=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(scores) + 1), scores, ".", ms=3)
    ax.axhline(threshold, color="red", lw=1, label=f"threshold {threshold:.1f}")
    ax.set_xscale("log")
    ax.set_xlabel("account rank")
    ax.set_ylabel("combined score (Fisher)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    err_console.print(f"plot saved to {path}")
