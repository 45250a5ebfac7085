"""Fixtures for the server tests: real ``distillguard serve`` subprocesses on loopback HTTP.

``tiny_server`` is one server with the tiny random model, shared by the whole session (it
loads in a few seconds and answers in milliseconds). These tests are about the serve layer,
so servers run with ``--no-guard`` (no API keys, limits or ledger; tests/guard covers those). ``serve`` starts further servers
(gateways in front of it, the bundled teacher) and stops them when the session ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack

import openai
import pytest

from distillguard.models import LoadedModel, load_model
from tests.servers import STARTUP_TIMEOUT_S, serve_process


@pytest.fixture(scope="session")
def serve() -> Iterator[Callable[..., str]]:
    """``serve("--model", "tiny", ...)`` → base URL of a server that lives until the session ends."""
    with ExitStack() as stack:
        yield lambda *args, timeout_s=STARTUP_TIMEOUT_S: stack.enter_context(
            serve_process(*args, timeout_s=timeout_s)
        )


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
