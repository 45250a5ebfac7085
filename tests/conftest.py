"""Session-wide fixtures: a real PostgreSQL server started for the tests (Debian's postgresql).

The server runs as the ``postgres`` user when the tests run as root (PostgreSQL refuses root),
in a throwaway data directory, on a free loopback port; each test that asks for
``postgres_url`` gets a fresh database in it.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile

import pytest

from tests.servers import free_port, new_postgres_database


def _pg_bindir() -> str | None:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
    )
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


@pytest.fixture(scope="session")
def postgres_server():
    """(host, port, user) of a PostgreSQL server that lives for the test session."""
    bindir = _pg_bindir()
    if bindir is None:
        pytest.fail(
            "PostgreSQL server binaries (initdb, pg_ctl) not found: install Debian's `postgresql` "
            "package (.ci/run does)"
        )
    base = tempfile.mkdtemp(prefix="dg-pg-")
    os.chmod(base, 0o755)
    run_as: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        user = pwd.getpwnam("postgres")
        os.chown(base, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    data, log = os.path.join(base, "data"), os.path.join(base, "server.log")
    port = free_port()
    subprocess.run(
        [*run_as, f"{bindir}/initdb", "-D", data, "-A", "trust", "-U", "dg", "--no-sync"],
        check=True,
        capture_output=True,
    )
    start = subprocess.run(
        [
            *run_as,
            f"{bindir}/pg_ctl",
            "-D",
            data,
            "-l",
            log,
            "-w",
            "-t",
            "60",
            "start",
            "-o",
            f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c max_connections=200",
        ],
        capture_output=True,
        text=True,
    )
    if start.returncode != 0:
        detail = open(log).read()[-2000:] if os.path.exists(log) else start.stderr
        pytest.fail(f"PostgreSQL did not start: {detail}")
    try:
        yield ("127.0.0.1", port, "dg")
    finally:
        subprocess.run(
            [*run_as, f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """SQLAlchemy URL of a fresh, empty database on the session's PostgreSQL server."""
    return new_postgres_database(postgres_server)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """The same test on SQLite (a file in tmp_path) and on PostgreSQL (a fresh database)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return request.getfixturevalue("postgres_url")
