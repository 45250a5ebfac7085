"""`distillguard serve` says at start, on stderr and without -v, where the ledger and the watermark
secret are: every investigator command needs both (issue 28: a user who never set them did not
know where they went). Real servers as subprocesses; stderr read apart from stdout."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx

from distillguard.cli import _masked
from distillguard.serve.process import distillguard_command, free_port, stop
from tests.servers import new_postgres_database


def serve_stderr(tmp_path: Path, *args: str, env: dict[str, str]) -> str:
    """Start `distillguard serve --model tiny ARGS`, wait until it answers, stop it; its stderr."""
    port = free_port()
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLGUARD_")}
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(
            distillguard_command("serve", "--model", "tiny", "--port", str(port), *args),
            stdout=o,
            stderr=e,
            env={**clean, **env},
        )
        try:
            deadline = time.monotonic() + 300
            while True:
                assert proc.poll() is None, err.read_text()
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, err.read_text()
                time.sleep(0.2)
        finally:
            stop(proc)
    return err.read_text()


def test_default_ledger_and_secret_paths_are_printed(tmp_path):
    data = tmp_path / "data"
    stderr = serve_stderr(tmp_path, env={"XDG_DATA_HOME": str(data)})
    ledger = data / "distillguard" / "ledger.db"
    secret = data / "distillguard" / "watermark.secret"
    assert f"guard on: ledger sqlite:///{ledger}\n" in stderr
    assert f"watermark secret: {secret} (the default file, shared by every --db;" in stderr
    assert secret.is_file()  # the file it names is the one the gateway uses
    assert secret.read_text().strip() not in stderr


def test_a_password_and_a_secret_from_the_environment_are_not_printed(tmp_path, postgres_server):
    password = "hunter2"
    url = new_postgres_database(postgres_server)  # trust auth: any password connects
    user = postgres_server[2]
    with_password = url.replace(f"//{user}@", f"//{user}:{password}@")
    assert with_password != url
    stderr = serve_stderr(
        tmp_path,
        "--db",
        with_password,
        env={"XDG_DATA_HOME": str(tmp_path / "data"), "DISTILLGUARD_WATERMARK_SECRET": "s3cr3t-x"},
    )
    assert f"guard on: ledger {url.replace(f'//{user}@', f'//{user}:***@')}" in stderr
    assert "watermark secret: from DISTILLGUARD_WATERMARK_SECRET" in stderr
    assert password not in stderr and "s3cr3t-x" not in stderr


def test_masked_hides_only_the_password():
    assert _masked("redis://:pw@cache:6379/0") == "redis://:***@cache:6379/0"
    assert _masked("redis://user:p%40ss@cache/1") == "redis://user:***@cache/1"
    assert _masked("redis://cache:6379/0") == "redis://cache:6379/0"


def test_an_unreachable_database_is_one_line_before_the_server_starts(tmp_path):
    """A wrong --db: exit 2 with one line naming the database (password masked) and the fix, not
    uvicorn's startup traceback."""
    port = free_port()  # nothing listens there
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLGUARD_")}
    done = subprocess.run(
        distillguard_command(
            "serve",
            "--model",
            "tiny",
            "--port",
            "0",
            "--db",
            f"postgresql+psycopg://dg:hunter2@127.0.0.1:{port}/dg",
        ),
        capture_output=True,
        text=True,
        timeout=300,
        env={**clean, "HOME": str(tmp_path)},
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "hunter2" not in done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1
    assert (
        f"cannot reach the ledger database postgresql+psycopg://dg:***@127.0.0.1:{port}/dg"
        in (error[0])
    )
    assert "--db" in error[0]
