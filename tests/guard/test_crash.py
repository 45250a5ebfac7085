"""Crash safety: after SIGKILL of the gateway under concurrent load, every request whose complete
response a client received is in the ledger (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid

import httpx
from sqlalchemy import select

from distillguard.guard.db import make_engine
from distillguard.guard.schema import LedgerRow
from tests.servers import run_cli, server_process

WORKERS = 8
KILL_AFTER_COMPLETED = 40


def _one_request(url: str, key: str, marker: str, stream: bool) -> bool:
    """Send one request; True only if its complete response arrived."""
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": marker}],
        "max_tokens": 8,
        "stream": stream,
    }
    headers = {"Authorization": f"Bearer {key}"}
    if not stream:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=30)
        return r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=30
    ) as r:
        if r.status_code != 200:
            return False
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
        return bool(lines) and lines[-1] == "data: [DONE]"


def test_sigkill_under_load_loses_no_acknowledged_request(db_url):
    made = run_cli("keys", "create", "--account", "load", "--db", db_url, "--json")
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)["key"]
    completed: list[str] = []
    attempted: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    with server_process("--model", "tiny", "--db", db_url) as server:

        def worker(w: int) -> None:
            i = 0
            while not stop.is_set():
                marker = f"crash-{w}-{i}-{uuid.uuid4().hex[:8]}"
                i += 1
                with lock:
                    attempted.append(marker)
                try:
                    ok = _one_request(server.url, key, marker, stream=bool(i % 2))
                except httpx.HTTPError:
                    ok = False  # the server died mid-request: not acknowledged
                if ok:
                    with lock:
                        completed.append(marker)
                elif server.proc.poll() is not None:
                    return

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(WORKERS)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while len(completed) < KILL_AFTER_COMPLETED and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(server.proc.pid, signal.SIGKILL)  # mid-load: requests are in flight right now
        server.proc.wait()
        stop.set()
        for t in threads:
            t.join(timeout=60)

    assert len(completed) >= KILL_AFTER_COMPLETED
    assert len(attempted) > len(completed)  # some requests were cut off by the kill
    engine = make_engine(db_url)
    with engine.connect() as conn:
        logged = {
            row.request_body["messages"][0]["content"]
            for row in conn.execute(
                select(LedgerRow.request_body).where(LedgerRow.account_id == "load")
            )
        }
    engine.dispose()
    missing = [m for m in completed if m not in logged]
    assert missing == [], (
        f"{len(missing)} acknowledged requests are not in the ledger: {missing[:5]}"
    )

    # The gateway restarts on the same database and serves again.
    with server_process("--model", "tiny", "--db", db_url) as server:
        assert _one_request(server.url, key, "after restart", stream=False)
