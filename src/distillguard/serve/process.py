"""Run a server in a subprocess on loopback until it answers ``/healthz``, and stop it after.

One helper for everything that needs a real ``distillguard serve`` beside it: the arena's demo,
the benches and the test suite (whose fixture turns :class:`ServerStartError` into a test
failure). No library does this for an arbitrary command: uvicorn's own ``Server`` runs in-process,
and the point here is a separate process the caller can SIGKILL, exactly as a crash would.

The server's output goes to a file, never a pipe: a pipe nobody reads fills up and blocks the
server. When it fails to start, the error quotes the end of that file.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from distillguard.errors import ServerStartError

STARTUP_TIMEOUT_S = (
    120.0  # the bundled teacher loads in ~40 s on 2 busy cores; CI machines are slower
)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it, so parallel runs do not clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """A started server: its base URL (no ``/v1``), port, process and output file."""

    url: str
    port: int
    proc: subprocess.Popen
    log: IO[bytes]

    def log_tail(self, chars: int = 4000) -> str:
        """The last ``chars`` characters the server wrote (stdout and stderr together)."""
        self.log.flush()
        self.log.seek(0, os.SEEK_END)
        size = self.log.tell()
        self.log.seek(max(0, size - chars))
        return self.log.read().decode("utf-8", "replace")


def distillguard_command(*args: str) -> list[str]:
    """``distillguard ARGS`` run by this interpreter (so a virtualenv's package is the one tested)."""
    return [sys.executable, "-m", "distillguard.cli", *args]


@contextmanager
def process_until_healthy(
    cmd: Sequence[str],
    url: str,
    *,
    port: int,
    log_path: Path | str | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float = STARTUP_TIMEOUT_S,
    poll_s: float = 0.1,
    stop_timeout_s: float = 20.0,
    health_path: str = "/healthz",
) -> Iterator[ServerProcess]:
    """Start ``cmd``; yield once ``GET url+health_path`` answers 200; terminate it (then kill) after.

    ``log_path`` keeps the server's output (appended to); without it a temporary file holds it.
    Raises :class:`ServerStartError`, quoting the output's tail, when the process exits first or
    does not answer within ``timeout_s``.
    """
    import httpx

    name = " ".join([Path(cmd[0]).name, *map(str, cmd[1:])])
    with ExitStack() as stack:
        log = stack.enter_context(open(log_path, "a+b") if log_path else tempfile.TemporaryFile())
        # Same process group as the caller: a Ctrl-C in the terminal stops both (uvicorn shuts down
        # cleanly on SIGINT), and a server never outlives a killed test run.
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        server = ServerProcess(url=url, port=port, proc=proc, log=log)

        def failed(why: str) -> ServerStartError:
            where = f" (its log: {log_path})" if log_path else ""
            return ServerStartError(f"`{name}` {why}{where}:\n{server.log_tail()}")

        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if proc.poll() is not None:
                    raise failed(f"exited with {proc.returncode}")
                try:
                    if httpx.get(url + health_path, timeout=1.0).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise failed(f"did not answer {health_path} within {timeout_s:.0f} s")
                time.sleep(poll_s)
            yield server
        finally:
            stop(proc, stop_timeout_s)


def stop(proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """SIGTERM (uvicorn finishes in-flight requests and closes the ledger), SIGKILL if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def serve_subprocess(
    *args: str, host: str = "127.0.0.1", port: int | None = None, **kwargs
) -> Iterator[ServerProcess]:
    """``distillguard serve ARGS --host HOST --port PORT`` (a free port unless given), healthy; see
    :func:`process_until_healthy` for the keyword arguments."""
    port = port or free_port(host)
    cmd = distillguard_command("serve", "--host", host, "--port", str(port), *args)
    with process_until_healthy(cmd, f"http://{host}:{port}", port=port, **kwargs) as server:
        yield server
