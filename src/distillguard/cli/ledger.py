"""``distillguard ledger``: export the ledger as a traffic log, import a traffic log."""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime
from pathlib import Path

import typer

from distillguard.cli.common import DB_HELP, console, err_console
from distillguard.errors import ConfigError

ledger_app = typer.Typer(
    help="Export, import and prune the request ledger (traffic-log JSONL or Parquet).",
    no_args_is_help=True,
)


def _since(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(
            f"--since {value!r} is neither epoch seconds nor an ISO date like 2026-11-28T10:00"
        ) from None
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


@ledger_app.command("export")
def export(
    db: str | None = typer.Option(None, envvar="DISTILLGUARD_DB", help=DB_HELP),
    since: str | None = typer.Option(
        None, help="only requests at or after this time (epoch or ISO 8601, UTC)"
    ),
    account: str | None = typer.Option(None, help="only this account"),
    out: str = typer.Option("-", "--out", "-o", help="output file (- for stdout)"),
    fmt: str | None = typer.Option(
        None,
        "--format",
        "-f",
        help="jsonl or parquet (default: parquet for an --out ending in .parquet, else jsonl)",
    ),
) -> None:
    """Write the ledger in the traffic-log format: JSONL (one JSON request per line) or Parquet
    (one row per request; what `distillguard detect --traffic` and engines like DuckDB, Polars
    or Spark read at scale).

    Examples:

      distillguard ledger export -o traffic.jsonl

      distillguard ledger export --db postgresql+psycopg://dg@db/dg --since 2026-11-01 -o nov.parquet
    """
    from distillguard.guard.db import make_engine, migrate
    from distillguard.guard.ledger import export_traffic, iter_traffic

    if fmt is None:
        fmt = "parquet" if out.lower().endswith((".parquet", ".pq")) else "jsonl"
    if fmt not in ("jsonl", "parquet"):
        raise ConfigError(f"--format {fmt!r} is not one of: jsonl, parquet")
    if fmt == "parquet" and out == "-":
        raise ConfigError("--format parquet needs a file: add -o FILE.parquet")
    engine = make_engine(db)
    migrate(engine)
    if out == "-":
        n = export_traffic(engine, sys.stdout, since=_since(since), account=account)
    else:
        # as private as the ledger it copies (a new file: 0600; an existing one keeps its mode)
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        if fmt == "parquet":
            from distillguard.detect.parquet import write_traffic

            with open(fd, "wb") as fh:
                n = write_traffic(iter_traffic(engine, since=_since(since), account=account), fh)
        else:
            with open(fd, "w", encoding="utf-8") as fh:
                n = export_traffic(engine, fh, since=_since(since), account=account)
    err_console.print(f"exported {n} requests")


@ledger_app.command("import")
def import_(
    file: Path = typer.Argument(..., help="traffic-log JSONL file (- for stdin)"),
    db: str | None = typer.Option(None, envvar="DISTILLGUARD_DB", help=DB_HELP),
) -> None:
    """Load a traffic log into the ledger (idempotent: importing a file twice adds it once).

    Example: distillguard ledger import traffic.jsonl --db ledger.db
    """
    from distillguard.guard.db import make_engine, migrate
    from distillguard.guard.ledger import import_traffic

    engine = make_engine(db)
    migrate(engine)
    if str(file) == "-":
        n = import_traffic(engine, sys.stdin.buffer, source="<stdin>")
    else:
        if not file.is_file():
            raise ConfigError(f"no such traffic file: {file}")
        with open(file, "rb") as fh:  # split at b"\n" only: see distillguard.jsonl
            n = import_traffic(engine, fh, source=str(file))
    err_console.print(f"read {n} requests")


@ledger_app.command("prune")
def prune(
    older_than: str = typer.Option(
        ..., "--older-than", help="delete what is older than this: 30d, 12h, 90m, 45s, 2w"
    ),
    db: str | None = typer.Option(None, envvar="DISTILLGUARD_DB", help=DB_HELP),
) -> None:
    """Delete ledger rows and stored idempotent responses older than an age (retention).

    Safe while the gateway runs (it deletes in small transactions). Verdicts are kept.

    Example: distillguard ledger prune --older-than 30d --db ledger.db
    """
    import time

    from distillguard.guard.db import make_engine, migrate
    from distillguard.guard.privacy import parse_age
    from distillguard.guard.privacy import prune as prune_ledger

    before = time.time() - parse_age(older_than)
    engine = make_engine(db)
    migrate(engine)
    counts = prune_ledger(engine, before)
    engine.dispose()
    cutoff = datetime.fromtimestamp(before, UTC).isoformat(timespec="seconds")
    console.print(
        f"deleted {counts['requests']} requests and {counts['idempotent_responses']} idempotent "
        f"responses from before {cutoff}"
    )
