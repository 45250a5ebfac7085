"""How long a finished request waits for its verdict: the old in-memory queue against the
ledger feed that ``serve --detect CAL`` now uses behind its monitor lease (guard/shared_monitor.py).

Three paths, run alternately for ``--rounds`` rounds, each ``--requests`` requests on a fresh
SQLite ledger, one at a time with a pause between them (so each is timed alone, not in a batch):

- ``queue``: the monitor fed this gateway's rows in memory (``guard/monitor.py``'s
  ``MonitorWorker``, what a monitor given without a calibration still uses);
- ``lease-own``: the lease holder, for its own requests (they wake it; it reads the row just
  committed from the ledger);
- ``lease-other``: the lease holder, for requests another replica (a standby gateway on the same
  ledger) finished: read at the next poll (``--poll``).

The detector is a stub that flags each account at its first request, so every request yields
one verdict and the detector's own time (the same on every path) is left out. Latency: from the
moment the recorder's ``finish`` returns (the ledger row committed) to the verdict's insert.
Writes ``--out``:

    nice -n 5 .venv/bin/python bench/inprocess_lease_latency.py --out \
        bench/results/inprocess_lease_latency.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from _provenance import code_version


class FirstRequestFlags:
    """A monitor that puts each account at 'watch' on its first request."""

    monitor = None  # no inner detector: the checkpoint has no calibration objects to share

    def __init__(self):
        self.seen: set[str] = set()

    def observe(self, record: dict):
        account = record["account"]
        if account in self.seen:
            return None
        self.seen.add(account)
        return SimpleNamespace(level="watch", score=1.0, reasons=["first request"])


def _guard(db: str, cal: Path | None, state: Path, poll_s: float):
    from distillguard.guard.gateway import Guard, GuardConfig

    extra = (
        {"detect_calibration": str(cal), "detect_state": str(state), "detect_poll_s": poll_s}
        if cal is not None
        else {}
    )
    return Guard(
        GuardConfig(db=db, watermark=False, verdict_cache_ttl_s=0, **extra),
        monitor=FirstRequestFlags(),
    )


def _log(account: str):
    from distillguard.guard.keys import KeyRecord
    from distillguard.guard.limits import Limits
    from distillguard.guard.requestlog import RequestLog

    key = KeyRecord(
        id=f"k-{account}",
        account=account,
        prefix="dg-",
        name=None,
        created_at=0.0,
        revoked_at=None,
        limits=Limits(),
    )
    log = RequestLog(client_ip="10.0.0.1", key=key)
    log.body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}]}
    log.texts = {0: "hi"}
    log.prompt_tokens, log.completion_tokens = 3, 1
    return log


async def one_run(kind: str, work: Path, cal: Path, n: int, pause_s: float, poll_s: float):
    db = f"sqlite:///{work / f'{kind}-{time.monotonic_ns()}.db'}"
    state = work / f"state-{time.monotonic_ns()}"
    holder = _guard(db, None if kind == "queue" else cal, state, poll_s)
    await holder.start()
    other = None
    if kind == "lease-other":
        other = _guard(db, cal, state, poll_s)
        await other.start()
        assert not other.monitor.holding
    written: dict[str, float] = {}
    record = holder.policing.record

    def timed_record(account, *args, **kwargs):
        row = record(account, *args, **kwargs)
        written[account] = time.perf_counter()
        return row

    holder.policing.record = timed_record
    committed: dict[str, float] = {}
    sender = other or holder
    try:
        for i in range(n):
            account = f"a{i}"
            await sender.recorder.finish(_log(account))
            committed[account] = time.perf_counter()
            await asyncio.sleep(pause_s)
        deadline = time.monotonic() + 30
        while len(written) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    finally:
        if other is not None:
            await other.close()
        await holder.close()
    assert len(written) == n, f"{kind}: {len(written)} of {n} verdicts"
    return [1000 * (written[a] - committed[a]) for a in committed]


def _summary(ms: list[float]) -> dict:
    ms = sorted(ms)
    return {
        "median_ms": round(statistics.median(ms), 2),
        "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 2),
        "max_ms": round(ms[-1], 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pause", type=float, default=0.05, help="seconds between requests")
    ap.add_argument("--poll", type=float, default=0.25, help="--detect-poll (GuardConfig default)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.getLogger("distillguard").setLevel(logging.ERROR)

    kinds = ("queue", "lease-own", "lease-other")
    runs: dict[str, list[float]] = {k: [] for k in kinds}
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cal = work / "cal.bin"  # only its digest is read (the checkpoint's header)
        cal.write_bytes(b"stub calibration")
        for _ in range(args.rounds):
            for kind in kinds:
                runs[kind] += asyncio.run(
                    one_run(kind, work, cal, args.requests, args.pause, args.poll)
                )
    out = {
        "code": code_version(),
        "requests_per_round": args.requests,
        "rounds": args.rounds,
        "pause_s": args.pause,
        "poll_s": args.poll,
        "latency": {k: _summary(v) for k, v in runs.items()},
        "load_avg_1m": [round(load, 2), round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
