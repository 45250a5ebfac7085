"""``distillguard monitor``: the online detector of every gateway replica, as its own process."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import typer

from distillguard.cli.common import DB_HELP, console, err_console
from distillguard.cli.options import option, seconds_or_off
from distillguard.guard.config import GuardConfig


def monitor_command(
    calibration: str = typer.Option(
        ...,
        "--calibration",
        "-c",
        envvar="DISTILLGUARD_DETECT_CALIBRATION",
        help="calibration file (`distillguard detect --save-calibration`), the one replicas "
        "would have been given with serve --detect",
    ),
    state: Path = typer.Option(
        ...,
        "--state",
        help="directory of the checkpoint (monitor state + ledger cursor); created 0700",
    ),
    db: str | None = typer.Option(None, envvar="DISTILLGUARD_DB", help=DB_HELP),
    policy: str | None = typer.Option(
        None,
        envvar="DISTILLGUARD_POLICY_FILE",
        help="the replicas' policy ladder (for its alerts: who is told when an account climbs)",
    ),
    extracting_after: int = option(GuardConfig, "extracting_after"),
    extracting_after_s: float | None = option(
        GuardConfig, "extracting_after_s", metavar="SECONDS|off", parser=seconds_or_off
    ),
    poll: float = typer.Option(0.5, min=0.01, help="seconds between reads of an idle ledger"),
    lag: float = typer.Option(
        120.0,
        min=0.0,
        help="seconds a ledger id missing below newer ones is awaited (PostgreSQL commits "
        "out of id order) before it is taken for a rolled-back one",
    ),
    checkpoint_every: float = typer.Option(
        30.0, min=0.0, help="save the state at least this often (seconds), and at SIGTERM"
    ),
    checkpoint_requests: int = typer.Option(
        10_000, min=1, help="save the state after this many requests, whatever the time"
    ),
    rebuild: bool = typer.Option(
        False,
        "--rebuild",
        help="ignore the checkpoint and replay the ledger from its first row (after a "
        "calibration or version change)",
    ),
    wait: bool = typer.Option(
        False,
        "--wait",
        help="when another monitor follows this ledger, wait until it stops (or dies) and take "
        "over, instead of refusing",
    ),
    lease_ttl: float = typer.Option(
        15.0,
        min=1.0,
        help="seconds without a heartbeat after which a monitor's lease on the ledger is taken "
        "for dead and taken over (it renews every third of this)",
    ),
    once: bool = typer.Option(
        False, "--once", help="read everything committed so far, save the state and exit"
    ),
    show: bool = typer.Option(
        False, "--status", help="print the checkpoint's header as JSON and exit"
    ),
) -> None:
    """Follow the shared ledger and detect extraction for every gateway replica at once.

    Run one of these beside replicas started with `serve --detect external`: it reads every
    replica's finished requests from the ledger (--db), scores them with the same online
    detector `serve --detect CAL` runs in-process, and records verdicts in the ledger, where every
    replica reads an account's level. Its state is checkpointed in --state, so a restart goes on
    where it stopped (SIGTERM saves it; after kill -9 the requests since the last save are
    replayed). While it is down no new verdicts are reached; no request waits for it.

    One monitor per ledger: it holds a lease in the ledger, renewed every few seconds. A second
    one is refused (exit 2, naming the holder), or with --wait waits for it to stop; the lease of
    one that died (kill -9, a lost machine) is taken over after --lease-ttl seconds.

    Example:

      distillguard monitor --db postgresql+psycopg://dg@db/dg -c cal.npz --state /var/lib/dg-monitor
    """
    from distillguard.guard.detector_service import CHECKPOINT_NAME, read_header

    if show:
        path = state / CHECKPOINT_NAME
        if not path.exists():
            from distillguard.errors import ConfigError

            raise ConfigError(f"no checkpoint in {state} (no {CHECKPOINT_NAME}); check --state")
        console.print_json(json.dumps(read_header(path)))
        return

    from distillguard.guard.db import make_engine, migrate
    from distillguard.guard.detector_service import (
        Checkpoint,
        DetectorService,
        Lease,
        LedgerFeed,
        code_fingerprint,
        file_digest,
    )
    from distillguard.guard.metrics import Metrics
    from distillguard.guard.online import OnlineDetection
    from distillguard.guard.policy import PolicyConfig
    from distillguard.guard.verdicts import Verdicts

    with err_console.status(f"loading detection calibration {calibration} ..."):
        detection = OnlineDetection.from_calibration(
            calibration, extracting_after=extracting_after, extracting_after_s=extracting_after_s
        )
    engine = make_engine(db)
    migrate(engine)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    # one monitor per ledger: two would both record every verdict and overwrite the checkpoint
    lease = Lease(engine, ttl_s=lease_ttl)
    if not lease.acquire(stop, wait=wait, on_wait=lambda msg: err_console.print(msg)):
        engine.dispose()
        return  # stopped while waiting for the lease
    checkpoint = Checkpoint(Path(state), file_digest(calibration), code_fingerprint(detection))
    verdicts = Verdicts(
        engine,
        PolicyConfig.load(policy) if policy else PolicyConfig(),
        Metrics(),
        cache_ttl_s=0.0,
    )
    service = DetectorService(
        detection,
        verdicts,
        LedgerFeed(engine, lag_s=lag),
        checkpoint,
        poll_s=poll,
        every_s=checkpoint_every,
        every_n=checkpoint_requests,
        lease=lease,
    )
    try:
        header = None if rebuild else service.restore()
    except BaseException:
        lease.release()
        engine.dispose()
        raise
    where = (
        f"from ledger row {header['cursor']['high']} ({header['requests']} requests in the state)"
        if header
        else "from the ledger's first row"
    )
    err_console.print(
        f"[bold]distillguard[/] monitor following {engine.url.render_as_string()} {where}; "
        f"state in {checkpoint.path} (lease held as {lease.holder}); "
        f"{service.detection.describe()}",
        soft_wrap=True,
        highlight=False,
    )
    try:
        service.run(stop, once=once)
    finally:
        lease.release()
        engine.dispose()
    err_console.print(
        f"[bold]distillguard[/] monitor stopped at ledger row {service.feed.high} "
        f"({service.requests} requests in the state, {service.errors} failed batches)"
    )
