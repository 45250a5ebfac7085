"""JSONL files through the real CLI: a U+2028, U+2029 or U+0085 inside a prompt is data (each
split a record in two when files were read with ``str.splitlines()``: `distill curate` said
"data.jsonl:45: not valid JSON", `detect --ledger` died with a JSONDecodeError traceback), and a
broken line is a one-line error naming ``path:line``, exit code 2, no traceback."""

from __future__ import annotations

import json
import random

from datasets import load_from_disk

from tests.detect.synth import benign_account
from tests.servers import run_cli

SEPARATORS = ("\u2028", "\u2029", "\x85")
# rich wraps a message at the console's width; the error must be one line however long the path
WIDE = {"COLUMNS": "400"}


def _data_rows(n: int) -> list[dict]:
    return [
        {
            "id": f"p{i}#0",
            "prompt_id": f"p{i}",
            "messages": [
                {
                    "role": "user",
                    "content": f"Explain topic {i}{SEPARATORS[i % 3]}in simple terms, please",
                }
            ],
            "response": f"Here is topic {i}{SEPARATORS[(i + 1) % 3]}explained for you.",
            "finish_reason": "stop",
        }
        for i in range(12)
    ][:n]


def test_curate_reads_separators_inside_prompts(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _data_rows(12)),
        encoding="utf-8",
    )
    assert len(data.read_text(encoding="utf-8").splitlines()) > 12  # what broke the old reader
    out = tmp_path / "ds"
    proc = run_cli("distill", "curate", "--data", str(data), "--out", str(out), env=WIDE)
    assert proc.returncode == 0, proc.stderr
    ds = load_from_disk(str(out))
    prompts = sorted(r["messages"][0]["content"] for split in ds.values() for r in split)
    assert prompts == sorted(r["messages"][0]["content"] for r in _data_rows(12))


def test_curate_names_a_broken_line_without_a_traceback(tmp_path):
    rows = [json.dumps(r, ensure_ascii=False) for r in _data_rows(4)]
    rows[2] = rows[2][:-1]  # the closing brace lost
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    proc = run_cli(
        "distill", "curate", "--data", str(data), "--out", str(tmp_path / "ds"), env=WIDE
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    # off a terminal the spinner first says what the command was doing (tests/cli/test_spinner.py)
    assert lines[:-1] == ["curating ..."], proc.stderr
    assert f"{data}:3: not valid JSON: Expecting ',' delimiter at column" in lines[-1]


def test_detect_ledger_and_traffic_read_separators_inside_prompts(tmp_path):
    rng = random.Random(3)
    benign = [r for i in range(40) for r in benign_account(rng, f"b{i}", days=2)]
    traffic = [r for i in range(6) for r in benign_account(rng, f"e{i}")]
    for i, r in enumerate(traffic):  # a separator in every prompt, kept raw as the export does
        r["request"]["messages"][-1]["content"] += f" see{SEPARATORS[i % 3]}here"
    cal = tmp_path / "cal.jsonl"
    cal.write_text("".join(json.dumps(r) + "\n" for r in benign))
    tfile = tmp_path / "traffic.jsonl"
    tfile.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in traffic), encoding="utf-8"
    )
    db = str(tmp_path / "ledger.db")
    imported = run_cli("ledger", "import", str(tfile), "--db", db, env=WIDE)
    assert imported.returncode == 0, imported.stderr
    assert f"read {len(traffic)} requests" in imported.stderr
    common = ("--calibrate", str(cal), "--detectors", "volume,timing", "--json")
    from_ledger = run_cli("detect", "--ledger", db, *common, env=WIDE, timeout=300)
    assert from_ledger.returncode == 0, from_ledger.stderr
    from_file = run_cli("detect", "--traffic", str(tfile), *common, env=WIDE, timeout=300)
    assert from_file.returncode == 0, from_file.stderr
    accounts = json.loads(from_ledger.stdout)["accounts"]
    assert sorted(a["account"] for a in accounts) == [f"e{i}" for i in range(6)]
    assert sum(a["requests"] for a in accounts) == len(traffic)
    assert accounts == json.loads(from_file.stdout)["accounts"]


def test_detect_names_a_broken_line_without_a_traceback(tmp_path):
    good = {"ts": 1.0, "account": "a", "request": {"messages": []}}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(good) + "\n" + '["not", "a", "record"]\n')
    proc = run_cli("detect", "--traffic", str(bad), "--calibrate", str(bad), env=WIDE)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: {bad}:2: expected a JSON object, got an array"
