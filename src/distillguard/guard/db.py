"""Database URLs, engines and migrations for the gateway (SQLite by default, PostgreSQL at scale)."""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from distillguard.errors import ConfigError

MIGRATIONS = Path(__file__).with_name("migrations")


def default_db_url() -> str:
    """``sqlite:///`` under the user's data directory (``$XDG_DATA_HOME/distillguard/ledger.db``).

    The folder is ours alone, so it is made 0700 even when an older version created it 0755: it
    holds the ledger (every prompt, answer, IP and account) and the watermark secret.
    """
    root = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    path = Path(root) / "distillguard" / "ledger.db"
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    return f"sqlite:///{path}"


def normalize_url(url: str | None) -> str:
    """Accept a bare file path for SQLite; everything else is a SQLAlchemy URL."""
    if not url:
        return default_db_url()
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    return url


def make_engine(url: str | None) -> Engine:
    url = normalize_url(url)
    try:
        if url.startswith("sqlite"):
            _create_private_sqlite(url)
            engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            engine = create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=4)
    except (ArgumentError, NoSuchModuleError) as exc:
        raise ConfigError(
            f"invalid database URL {url!r}: {exc}; use a path, sqlite:///FILE or "
            "postgresql+psycopg://USER@HOST/DB"
        ) from None
    return engine


def _create_private_sqlite(url: str) -> None:
    """Create a new SQLite ledger file 0600 (its folder 0700 when we create that too) before
    SQLite opens it. SQLite gives the -wal and -shm files it creates later the database file's
    permissions, so all three stay private; no umask (process-wide, racy across threads) is
    touched. Existing files and folders keep the permissions their owner chose."""
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    if path.exists():
        return
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.close(
            os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        )  # an empty file is an empty database
    except FileExistsError:  # another process created it first
        pass


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets readers (export, admin) run while the gateway writes. synchronous=NORMAL makes a
    # commit durable against a crash or kill -9 of the process (the OS keeps the written WAL);
    # only a power loss can drop the last commits, which FULL would also cover at ~2x the fsyncs.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def check_reachable(engine: Engine) -> None:
    """A ConfigError naming the database and why, when it cannot be reached: before the server
    starts, so a wrong --db is one line, not uvicorn's startup traceback."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        with engine.connect():
            pass
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        raise ConfigError(
            f"cannot reach the ledger database {engine.url.render_as_string()}: "
            f"{type(getattr(exc, 'orig', None) or exc).__name__}: {reason[0] if reason else ''} "
            "(is the server running? check --db / DISTILLGUARD_DB)"
        ) from None


def migrate(engine: Engine) -> None:
    """Bring the database schema to the newest migration (idempotent, safe across replicas)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
