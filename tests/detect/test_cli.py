"""``distillguard detect`` end to end: a real subprocess on small files, and the full detector
set (MiniLM embeddings included) on arena traffic in process."""

from __future__ import annotations

import json
import os
import random
import subprocess

import pytest

from distillguard.serve.process import distillguard_command
from tests.detect.synth import benign_account, bulk_account


def cli(*args: str) -> subprocess.CompletedProcess:
    # wide columns: rich wraps messages at the terminal width, and we count lines
    return subprocess.run(
        distillguard_command("detect", *args),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "400"},
    )


def write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("detect")
    rng = random.Random(0)
    benign = [r for i in range(250) for r in benign_account(rng, f"b{i}", days=2)]
    traffic = [r for i in range(20) for r in benign_account(rng, f"e{i}")] + bulk_account(
        rng, "bot", 300
    )
    return write(d / "benign.jsonl", benign), write(d / "traffic.jsonl", traffic), d


def test_cli_json_report(files):
    benign, traffic, d = files
    out = cli(
        "--traffic",
        traffic,
        "--calibrate",
        benign,
        "--detectors",
        "volume,timing,shape,linking",
        "--target-fpr",
        "0.02",
        "--json",
        "--save-calibration",
        str(d / "cal.npz"),
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["target_fpr"] == 0.02 and report["threshold"] > 0
    rows = {a["account"]: a for a in report["accounts"]}
    assert len(rows) == 21 and rows["bot"]["flagged"] and rows["bot"]["flagged_at_request"] >= 1
    assert report["accounts"][0]["account"] == "bot"  # most suspicious first
    # the saved calibration gives the same report, as a table
    again = cli("--traffic", traffic, "--calibration", str(d / "cal.npz"))
    assert again.returncode == 0, again.stderr
    assert "bot" in again.stdout and "1 of 21 accounts flagged" in again.stdout
    # the same traffic in a ledger (SQLite), read through the ledger's export: the same report
    from distillguard.guard.db import make_engine, migrate
    from distillguard.guard.ledger import import_traffic

    engine = make_engine(str(d / "ledger.db"))
    migrate(engine)
    with open(traffic) as fh:
        import_traffic(engine, fh)
    engine.dispose()
    from_ledger = cli(
        "--ledger", str(d / "ledger.db"), "--calibration", str(d / "cal.npz"), "--json"
    )
    assert from_ledger.returncode == 0, from_ledger.stderr
    assert json.loads(from_ledger.stdout)["accounts"] == report["accounts"]


def test_cli_names_the_malformed_line(files, tmp_path):
    benign, _, _ = files
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"ts": 1, "account": "a", "request": {"messages": []}}\n\n{"ts": 2, "account": "a"\n'
    )
    out = cli("--traffic", str(bad), "--calibrate", benign)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.jsonl:3" in lines[0] and "not valid JSON" in lines[0]
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"ts": 1, "account": "a"}\n')
    out = cli("--traffic", str(missing), "--calibrate", benign)
    assert out.returncode == 2 and "missing.jsonl:1" in out.stderr and "'request'" in out.stderr
    out = cli("--traffic", str(bad))
    assert out.returncode == 2 and "--calibrate" in out.stderr


def test_all_detectors_with_minilm_on_arena_traffic(embedder, tmp_path):
    """Real embeddings, every detector: a bulk campaign outscores every benign user of the arena."""
    from distillguard.arena.traffic import TrafficConfig, generate_traffic
    from distillguard.detect import DetectConfig, calibrate, detect

    cal_records = list(
        generate_traffic(TrafficConfig(benign_accounts=12, pool="calibration", days=1, seed=1))
    )
    ev = list(
        generate_traffic(
            TrafficConfig(benign_accounts=6, campaigns=("bulk:1:120",), days=1, seed=2)
        )
    )
    cal = calibrate(cal_records, config=DetectConfig(target_fpr=0.05), embedder=embedder)
    assert cal.reference is not None and set(cal.tails) >= {"mmd", "prada", "coverage"}
    cal.save(tmp_path / "cal.npz")
    report = detect(ev, cal, embedder=embedder)
    results = report["results"]
    bot = next(r for r in results if r.label == "bulk")
    assert all(bot.score > r.score for r in results if r.label == "benign")
    assert report["accounts"][0]["account"] == bot.account


def ledger(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        distillguard_command("ledger", *args), capture_output=True, text=True, timeout=300
    )


def test_ledger_export_parquet_round_trip(files):
    """A real ledger exported as JSONL and as Parquet: the same records, and ``detect`` (calibrated
    from JSONL or from Parquet) gives the same report on both."""
    from distillguard.detect import parquet
    from distillguard.guard.db import make_engine, migrate
    from distillguard.guard.ledger import import_traffic, read_traffic

    benign, traffic, d = files
    db = str(d / "roundtrip.db")
    engine = make_engine(db)
    migrate(engine)
    with open(traffic) as fh:
        import_traffic(engine, fh)
    engine.dispose()
    with open(traffic) as fh:
        n = sum(1 for _ in read_traffic(fh))
    jsonl, pq_suffix, pq_flag = d / "x.jsonl", d / "x.parquet", d / "x.data"
    for args in (["-o", str(jsonl)], ["-o", str(pq_suffix)], ["-o", str(pq_flag), "-f", "parquet"]):
        out = ledger("export", "--db", db, *args)
        assert out.returncode == 0, out.stderr
        assert f"exported {n} requests" in out.stderr
    with open(jsonl) as fh:
        records = [r for _, r in read_traffic(fh)]
    assert len(records) == n and records[0]["response"]["status"] == 200
    assert list(parquet.read_traffic(pq_suffix)) == records
    assert list(parquet.read_traffic(pq_flag)) == records  # found by its magic bytes
    assert oct(pq_suffix.stat().st_mode & 0o777) == "0o600"  # as private as the ledger
    # the calibration file in Parquet too: both readers feed the same calibration and scoring
    benign_pq = d / "benign.parquet"
    with open(benign) as fh:
        parquet.write_traffic((r for _, r in read_traffic(fh)), benign_pq)
    args = ("--detectors", "volume,timing,shape,template,linking", "--target-fpr", "0.02", "--json")
    from_jsonl = cli("--traffic", str(jsonl), "--calibrate", benign, *args)
    from_pq = cli("--traffic", str(pq_suffix), "--calibrate", str(benign_pq), *args)
    assert from_jsonl.returncode == 0 and from_pq.returncode == 0, from_pq.stderr
    report = json.loads(from_pq.stdout)
    assert report == json.loads(from_jsonl.stdout)
    assert report["accounts"][0]["account"] == "bot" and report["accounts"][0]["flagged"]


def test_ledger_export_refuses_parquet_on_stdout_and_unknown_formats(files):
    _, _, d = files
    out = ledger("export", "--db", str(d / "empty.db"), "-f", "parquet")
    assert out.returncode == 2 and "-o FILE.parquet" in out.stderr
    out = ledger("export", "--db", str(d / "empty.db"), "-f", "csv", "-o", str(d / "x.csv"))
    assert out.returncode == 2 and "'csv'" in out.stderr and "jsonl, parquet" in out.stderr


def test_detect_names_the_bad_parquet_row(files, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    benign, _, _ = files
    bad = tmp_path / "bad.parquet"
    pq.write_table(
        pa.table({"ts": [1.0, 2.0], "account": ["a", "a"], "request": ['{"messages": []}', "{"]}),
        bad,
    )
    out = cli("--traffic", str(bad), "--calibrate", benign)
    assert out.returncode == 2
    assert "bad.parquet: row 2: not valid JSON" in out.stderr
    no_account = tmp_path / "no_account.parquet"
    pq.write_table(pa.table({"ts": [1.0], "request": ["{}"]}), no_account)
    out = cli("--traffic", str(no_account), "--calibrate", benign)
    assert out.returncode == 2 and "['account']" in out.stderr and "ledger export" in out.stderr
    not_parquet = tmp_path / "junk.parquet"
    not_parquet.write_text("hello")
    out = cli("--traffic", str(not_parquet), "--calibrate", benign)
    assert out.returncode == 2 and "not a readable Parquet file" in out.stderr
