"""What the gateway writes to disk is readable by its owner only: the ledger (database, WAL and
shared-memory files, and the folder we create for it) and every secret file (issue 24, item 6)."""

from __future__ import annotations

import stat
from pathlib import Path

from sqlalchemy import insert

from distillguard.guard.db import default_db_url, make_engine, migrate
from distillguard.guard.schema import LedgerRow
from distillguard.watermark.secret import load_secret, write_secret


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_sqlite_ledger_and_its_wal_and_shm_are_private(tmp_path):
    folder = tmp_path / "new" / "ledger"
    engine = make_engine(str(folder / "ledger.db"))
    migrate(engine)
    with engine.connect() as conn:  # held open: the -wal and -shm files exist while it is
        with conn.begin():
            conn.execute(
                insert(LedgerRow), [{"request_id": "r1", "ts": 1.0, "status": 200, "stream": False}]
            )
        files = [folder / "ledger.db", folder / "ledger.db-wal", folder / "ledger.db-shm"]
        assert all(f.exists() for f in files)
        assert {f.name: oct(mode(f)) for f in files} == {f.name: "0o600" for f in files}
    assert oct(mode(folder)) == "0o700"
    engine.dispose()


def test_an_existing_folder_is_left_as_the_user_made_it(tmp_path):
    tmp_path.chmod(0o755)
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    migrate(engine)
    engine.dispose()
    assert oct(mode(tmp_path)) == "0o755" and oct(mode(tmp_path / "ledger.db")) == "0o600"


def test_the_default_data_folder_is_private(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    url = default_db_url()
    assert url == f"sqlite:///{tmp_path / 'distillguard' / 'ledger.db'}"
    assert oct(mode(tmp_path / "distillguard")) == "0o700"


def test_an_existing_default_data_folder_is_made_private(tmp_path, monkeypatch):
    (tmp_path / "distillguard").mkdir(mode=0o755)
    (tmp_path / "distillguard").chmod(0o755)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    default_db_url()
    assert oct(mode(tmp_path / "distillguard")) == "0o700"


def test_the_generated_watermark_secret_is_private(tmp_path):
    path = tmp_path / "dg" / "watermark.secret"
    secret = load_secret(path=path)
    assert len(secret) == 64 and oct(mode(path)) == "0o600" and oct(mode(path.parent)) == "0o700"
    assert load_secret(path=path) == secret  # created once


def test_write_secret_makes_an_existing_file_private(tmp_path):
    path = tmp_path / "watermark.secret"
    path.write_text("old\n")
    path.chmod(0o644)
    write_secret(path, "new")
    assert path.read_text() == "new\n" and oct(mode(path)) == "0o600"


def test_a_ledger_export_is_as_private_as_the_ledger(tmp_path):
    from tests.servers import run_cli

    db, out = tmp_path / "ledger.db", tmp_path / "traffic.jsonl"
    engine = make_engine(str(db))
    migrate(engine)
    with engine.begin() as conn:
        conn.execute(
            insert(LedgerRow),
            [
                {
                    "request_id": "r1",
                    "ts": 1.0,
                    "account_id": "a",
                    "status": 200,
                    "stream": False,
                    "request_body": {"messages": []},
                }
            ],
        )
    engine.dispose()
    done = run_cli("ledger", "export", "--db", str(db), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert oct(mode(out)) == "0o600" and '"account": "a"' in out.read_text()
