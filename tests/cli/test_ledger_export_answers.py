"""`watermark detect -f <ledger export> --all-accounts` (the docs' recipe) reads the export as it
comes: a real gateway on the tiny model serves answers, two streams hung up early (499) and a
refused request (400); the export holds all of them, and the command skips the rows without an
answer, says how many and why, and still traces the answers to their account. It failed on the
first 499 row before ("no 'text' field or response text in this record")."""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter

import httpx

from tests.servers import run_cli, serve_process

ADMIN = "admin-" + uuid.uuid4().hex
# fixed (as in tests/watermark/test_serve_watermark.py): with the requests' seeds, the same
# answers and p-values on every run; written down before any run
SECRET = "test-secret-fixed-0"
MODEL = "tiny:ctx=8192"


def _key(url: str, account: str) -> str:
    r = httpx.post(
        f"{url}/admin/keys",
        json={"account": account},
        headers={"Authorization": f"Bearer {ADMIN}"},
        timeout=30,
    )
    assert r.status_code == 201, r.text
    return r.json()["key"]


def _hang_up_a_stream(url: str, key: str, i: int) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"count to a thousand {i}"}],
        "max_tokens": 4000,
        "stream": True,
        "seed": i,
    }
    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    ) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: "):
                break  # hang up after the first event


def _export(db: str, out) -> list[dict]:
    proc = run_cli("ledger", "export", "--db", db, "--account", "acme", "-o", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in out.read_bytes().split(b"\n") if line.strip()]


def test_watermark_detect_reads_a_ledger_export_as_it_comes(tmp_path):
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    env = {"DISTILLGUARD_WATERMARK_SECRET": SECRET, "DISTILLGUARD_ADMIN_KEY": ADMIN}
    wm = ("--watermark-scheme", "keyed-hash", "--watermark-delta", "4")
    with serve_process("--model", MODEL, "--db", db, *wm, env=env) as url:
        keys = {a: _key(url, a) for a in ("acme", "bystander")}
        for account, n in (("acme", 6), ("bystander", 3)):
            for i in range(n):
                r = httpx.post(
                    f"{url}/v1/chat/completions",
                    json={
                        "model": MODEL,
                        "messages": [{"role": "user", "content": f"tell me {i}"}],
                        "max_tokens": 80,
                        "seed": i,
                    },
                    headers={"Authorization": f"Bearer {keys[account]}"},
                    timeout=60,
                )
                assert r.status_code == 200, r.text
        for i in range(2):
            _hang_up_a_stream(url, keys["acme"], i)
        bad = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 0},
            headers={"Authorization": f"Bearer {keys['acme']}"},
            timeout=60,
        )
        assert bad.status_code == 400, bad.text
        out = tmp_path / "acme.jsonl"  # the docs' recipe: one account's export
        deadline = time.monotonic() + 60  # a hung-up request's row is written when it settles
        while len(rows := _export(db, out)) < 9 and time.monotonic() < deadline:
            time.sleep(0.5)
    statuses = sorted(r["response"]["status"] for r in rows)
    assert statuses == [200] * 6 + [400, 499, 499], statuses
    # The export keeps them: that is what tripped the reader. A stream hung up after its first
    # event usually carries no text; one whose first tokens went out before the server saw the
    # hang-up carries them (watermarked, sent to the client: evidence, not skipped).
    without = [r for r in rows if not r["response"].get("text")]
    skipped = Counter(f"status {r['response']['status']}" for r in without)
    assert skipped["status 400"] == 1 and len(without) >= 1

    detect = run_cli(
        "watermark",
        "detect",
        "-f",
        str(out),
        "--all-accounts",
        "--db",
        db,
        "--scheme",
        "keyed-hash",
        "--model",
        "tiny",
        "--json",
        env={"DISTILLGUARD_WATERMARK_SECRET": SECRET, "COLUMNS": "400"},
        timeout=600,  # loads the tokenizer and the ledger; a loaded CI machine is slow
    )
    assert detect.returncode == 0, detect.stderr
    assert f"skipped {len(without)} rows without an answer" in detect.stderr
    result = json.loads(detect.stdout)
    assert result["skipped"] == dict(skipped)
    assert result["traced"] == ["acme"]  # Holm over both accounts' keys
    by_account = {k["account"]: k for k in result["keys"]}
    assert set(by_account) == {"acme", "bystander"}

    # The same answers as a harvest's data.jsonl writes them (distill/store.py: the answer as
    # "response", its prompt as "messages"): every row was skipped as an empty answer before.
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(
            json.dumps({"messages": r["request"]["messages"], "response": r["response"]["text"]})
            + "\n"
            for r in rows
            if r["response"].get("text")
        )
    )
    harvested = run_cli(
        "watermark",
        "detect",
        "-f",
        str(data),
        "--all-accounts",
        "--db",
        db,
        "--scheme",
        "keyed-hash",
        "--model",
        "tiny",
        "--json",
        env={"DISTILLGUARD_WATERMARK_SECRET": SECRET, "COLUMNS": "400"},
        timeout=600,
    )
    assert harvested.returncode == 0, harvested.stderr
    assert "skipped" not in harvested.stderr
    assert json.loads(harvested.stdout)["traced"] == ["acme"]


def test_a_file_of_nothing_but_refusals_is_a_clear_error(tmp_path):
    out = tmp_path / "refused.jsonl"
    rec = {"ts": 1.0, "account": "a", "request": {"messages": []}, "response": {"status": 429}}
    out.write_text(json.dumps(rec) + "\n" + json.dumps(rec) + "\n")
    proc = run_cli(
        "watermark",
        "detect",
        "-f",
        str(out),
        "--account",
        "a",
        "--model",
        "tiny",
        env={"DISTILLGUARD_WATERMARK_SECRET": SECRET, "COLUMNS": "400"},
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        f"error: no answers to test in {out} (skipped 2 rows without an answer: 2 status 429)"
        in proc.stderr
    )


def test_a_ledger_export_gives_forensics_its_prompts(tmp_path):
    """`forensics radioactivity --prompts` takes an export as it comes: every row's request is a
    prompt (a refused or hung-up one too: the question was asked), the last user turn of each."""
    from distillguard.cli.forensics import read_prompts

    rows = [
        {
            "ts": 1.0 + i,
            "account": "acme",
            "request": {
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": f"question {i}\u2028more"},
                ]
            },
            "response": {"status": status, **({"text": "an answer"} if status == 200 else {})},
        }
        for i, status in enumerate((200, 499, 429, 200))
    ]
    out = tmp_path / "acme.jsonl"
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    assert read_prompts(str(out), None) == [f"question {i}\u2028more" for i in range(4)]
    assert read_prompts(str(out), 2) == ["question 0\u2028more", "question 1\u2028more"]
