"""The external detector (``distillguard monitor``) against the in-process monitor, per CPU-second.

The same arena traffic (one day, benign users and every campaign kind, the no-embedding
detectors: MiniLM's cost is the same on both paths and would drown the difference) is scored two
ways, after one untimed run of each, alternating for ``--rounds`` rounds with fresh state each
time so the shared machine's load falls on both alike:

- ``in-process``: what ``serve --detect`` does in its worker thread: the finished requests, as
  dicts in memory, through ``guard.monitor.observe_rows`` (score, then record escalations in the
  ledger's verdicts table);
- ``follower``: what ``distillguard monitor`` does: the same requests read back from a SQLite
  ledger by ``LedgerFeed``, the same ``observe_rows`` steps, a checkpoint every ``--every-n``
  requests and one at the end.

Each records requests per CPU-second of this process, and the follower the CPU it spent in
``LedgerFeed.poll`` (reading rows back) and in checkpoints; the ratio follower / in-process is
what following the ledger costs. Both write the same verdicts (checked). Prints
JSON and writes ``--out``:

    nice -n 10 .venv/bin/python bench/detector_follow.py --requests 3000 --rounds 5 \
        --out bench/results/detector_follow.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from _provenance import code_version

NO_EMBEDDINGS = ("volume", "timing", "shape", "linking")


def traffic(requests: int) -> tuple[list[dict], list[dict]]:
    from distillguard.arena.traffic import TrafficConfig, generate_traffic

    cal = generate_traffic(TrafficConfig(benign_accounts=200, pool="calibration", days=1, seed=11))
    records = generate_traffic(
        TrafficConfig(
            benign_accounts=150,
            days=1,
            seed=12,
            campaigns=("bulk:1:600", "template:1:400", "logprobs:1:400", "hydra:10:60"),
        )
    )
    return cal, records[:requests]


def ledger(path: Path, records: list[dict]):
    from distillguard.guard.db import make_engine, migrate
    from distillguard.guard.ledger import import_traffic

    engine = make_engine(f"sqlite:///{path}")
    migrate(engine)
    lines = [
        json.dumps({**r, "response": {**r.get("response", {}), "status": 200}}) for r in records
    ]
    import_traffic(engine, lines)
    return engine


def verdicts(engine) -> list[tuple]:
    from sqlalchemy import select

    from distillguard.guard.schema import Verdict

    with engine.connect() as conn:
        return [
            tuple(r)
            for r in conn.execute(
                select(Verdict.account_id, Verdict.level, Verdict.request_id).order_by(Verdict.id)
            )
        ]


def one_run(kind: str, cal_path: Path, records: list[dict], work: Path, every_n: int) -> dict:
    from sqlalchemy import delete, select

    from distillguard.guard.detector_service import (
        Checkpoint,
        DetectorService,
        LedgerFeed,
        code_fingerprint,
        file_digest,
    )
    from distillguard.guard.metrics import Metrics
    from distillguard.guard.monitor import observe_rows
    from distillguard.guard.online import OnlineDetection
    from distillguard.guard.policy import PolicyConfig
    from distillguard.guard.schema import LedgerRow, Verdict
    from distillguard.guard.verdicts import Verdicts

    engine = ledger(work / f"{kind}.db", records)
    with engine.begin() as conn:
        conn.execute(delete(Verdict))
    detection = OnlineDetection.from_calibration(cal_path)
    judge = Verdicts(engine, PolicyConfig(), Metrics(), cache_ttl_s=0)
    if kind == "in-process":
        with engine.connect() as conn:  # the rows as the recorder hands them over, in memory
            rows = [
                r._asdict()
                for r in conn.execute(select(*LedgerRow.__table__.columns).order_by(LedgerRow.id))
            ]
        t, cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(rows), 256):  # MonitorWorker's largest batch
            observe_rows(detection, judge, rows[i : i + 256])
    else:
        state = work / f"state-{time.monotonic_ns()}"
        service = DetectorService(
            detection,
            judge,
            LedgerFeed(engine),
            Checkpoint(state, file_digest(cal_path), code_fingerprint(detection)),
            every_n=every_n,
        )
        spent = {"poll": 0.0, "save": 0.0}
        for part, obj, name in (("poll", service.feed, "poll"), ("save", service, "save")):
            setattr(obj, name, _timed(getattr(obj, name), spent, part))
        t, cpu = time.perf_counter(), time.process_time()
        service.run(threading.Event(), once=True)
    dt, dcpu = time.perf_counter() - t, time.process_time() - cpu
    out = {
        "requests": len(records),
        "seconds": round(dt, 3),
        "cpu_seconds": round(dcpu, 3),
        "requests_per_cpu_s": round(len(records) / dcpu, 1),
        "verdicts": verdicts(engine),
    }
    if kind == "follower":  # CPU-s reading the ledger and writing checkpoints
        out.update({f"{k}_cpu_s": round(v, 3) for k, v in spent.items()})
    engine.dispose()
    return out


def _timed(fn, spent: dict, part: str):
    def wrapped(*args, **kwargs):
        cpu = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[part] += time.process_time() - cpu

    return wrapped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--every-n", type=int, default=1000, help="follower: checkpoint every N")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from distillguard.detect import DetectConfig, calibrate

    logging.getLogger("distillguard").setLevel(logging.ERROR)  # one alert per flagged account

    cal_records, records = traffic(args.requests)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cal_path = work / "cal.npz"
        calibrate(cal_records, config=DetectConfig(detectors=NO_EMBEDDINGS)).save(cal_path)
        runs: dict[str, list[dict]] = {"in-process": [], "follower": []}
        load = os.getloadavg()[0]
        for kind in runs:  # untimed: a fresh process's first run pays imports and caches
            one_run(kind, cal_path, records, work, args.every_n)
        for _ in range(args.rounds):
            for kind in runs:
                runs[kind].append(one_run(kind, cal_path, records, work, args.every_n))
        checkpoint_bytes = max(
            (p.stat().st_size for p in work.glob("state-*/detector.ckpt")), default=None
        )
    same = all(r["verdicts"] == runs["in-process"][0]["verdicts"] for k in runs for r in runs[k])
    med = {k: statistics.median(r["requests_per_cpu_s"] for r in v) for k, v in runs.items()}
    out = {
        "code": code_version(),
        "requests": len(records),
        "accounts": len({r["account"] for r in records}),
        "detectors": list(NO_EMBEDDINGS),
        "rounds": args.rounds,
        "checkpoint_every_n": args.every_n,
        "checkpoint_bytes": checkpoint_bytes,
        "same_verdicts": same,
        "verdicts": len(runs["in-process"][0]["verdicts"]),
        "requests_per_cpu_s": {k: [r["requests_per_cpu_s"] for r in v] for k, v in runs.items()},
        "median_requests_per_cpu_s": med,
        "follower_cpu_s": {
            part: [r[f"{part}_cpu_s"] for r in runs["follower"]] for part in ("poll", "save")
        },
        "in_process_cpu_s": [r["cpu_seconds"] for r in runs["in-process"]],
        "follower_total_cpu_s": [r["cpu_seconds"] for r in runs["follower"]],
        "follower_vs_in_process": round(med["follower"] / med["in-process"], 3),
        "load_avg_1m": [round(load, 2), round(os.getloadavg()[0], 2)],
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
