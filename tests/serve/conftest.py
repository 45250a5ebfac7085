"""Fixtures for the server tests: real ``distillguard serve`` subprocesses on loopback HTTP.

``tiny_server`` is one server with the tiny random model, shared by the whole session (it
loads in a few seconds and answers in milliseconds). These tests are about the serve layer,
so servers run with ``--no-guard`` (no API keys, limits or ledger; tests/guard covers those). ``serve`` starts further servers
(gateways in front of it, the bundled teacher) and stops them when the session ends.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import httpx
import openai
import pytest

from distillguard.models import LoadedModel, load_model

STARTUP_TIMEOUT_S = 120.0  # generous: CI machines with 2 busy cores start slowly


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it, so parallel runs do not clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_process(*args: str, timeout_s: float = STARTUP_TIMEOUT_S) -> Iterator[str]:
    """Run ``distillguard serve ARGS`` on a free loopback port; yield its base URL once /healthz answers.

    The server's stderr goes to a file (a pipe nobody reads could fill and block the server)
    and is quoted in the failure when the server dies or never becomes healthy.
    """
    port = free_port()
    cmd = [sys.executable, "-m", "distillguard.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    base_url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})

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
            yield base_url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session")
def serve() -> Iterator[Callable[..., str]]:
    """``serve("--model", "tiny", ...)`` → base URL of a server that lives until the session ends."""
    with ExitStack() as stack:
        yield lambda *args, timeout_s=STARTUP_TIMEOUT_S: stack.enter_context(serve_process(*args, timeout_s=timeout_s))


@pytest.fixture(scope="session")
def tiny_server(serve) -> str:
    """Base URL (no ``/v1``) of ``distillguard serve --model tiny --no-guard`` (the serve layer alone)."""
    return serve("--model", "tiny", "--no-guard")


@pytest.fixture(scope="session")
def tiny_lm() -> LoadedModel:
    """The same tiny model the server loads (deterministic weights), for token counts and engine tests."""
    return load_model("tiny", device="cpu")


@pytest.fixture(scope="session")
def client(tiny_server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{tiny_server}/v1", api_key="x", max_retries=0, timeout=60) as c:
        yield c
