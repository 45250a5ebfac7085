"""Real ``distillguard serve`` subprocesses on loopback for the tests.

:func:`server_process` starts one on a free port, waits for ``/healthz`` and yields a
:class:`Server` (URL and process, so tests can SIGKILL it); the server's stderr goes to a file
(a pipe nobody reads could fill and block the server) and is quoted when it fails to start.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import pytest

STARTUP_TIMEOUT_S = 120.0  # generous: CI machines with 2 busy cores start slowly


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it, so parallel runs do not clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    port: int


@contextmanager
def server_process(*args: str, timeout_s: float = STARTUP_TIMEOUT_S, env: dict | None = None,
                   port: int | None = None) -> Iterator[Server]:
    """Run ``distillguard serve ARGS`` on loopback; yield once ``/healthz`` answers; stop it after."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "distillguard.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    base_url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

        def server_stderr() -> str:
            stderr.seek(0)
            return stderr.read().decode("utf-8", "replace")[-4000:]

        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"`{' '.join(cmd[2:])}` exited with {proc.returncode}:\n{server_stderr()}")
                try:
                    if httpx.get(f"{base_url}/healthz", timeout=1.0).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"`{' '.join(cmd[2:])}` not healthy after {timeout_s:.0f} s:\n{server_stderr()}")
                time.sleep(0.1)
            yield Server(url=base_url, proc=proc, port=port)
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@contextmanager
def serve_process(*args: str, timeout_s: float = STARTUP_TIMEOUT_S, env: dict | None = None) -> Iterator[str]:
    """Like :func:`server_process`, yielding only the base URL."""
    with server_process(*args, timeout_s=timeout_s, env=env) as server:
        yield server.url


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``distillguard ARGS`` in a subprocess (the real CLI boundary)."""
    return subprocess.run([sys.executable, "-m", "distillguard.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
