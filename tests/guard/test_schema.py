"""Schemas change only through migrations: the migrated database equals the ORM models exactly."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from distillguard.guard.db import make_engine, migrate
from distillguard.guard.schema import Base


def test_migrations_match_models_and_are_idempotent(db_url):
    engine = make_engine(db_url)
    migrate(engine)
    migrate(engine)  # a second replica starting up is a no-op
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    engine.dispose()


def test_schema_pinned(db_url):
    """The exact columns and indexes the detectors and the admin API rely on."""
    engine = make_engine(db_url)
    migrate(engine)
    insp = inspect(engine)
    assert set(insp.get_table_names()) >= {"accounts", "api_keys", "requests", "alembic_version"}
    assert [c["name"] for c in insp.get_columns("requests")] == [
        "id",
        "request_id",
        "ts",
        "account_id",
        "key_id",
        "client_ip",
        "model",
        "request_body",
        "response_text",
        "prompt_tokens",
        "completion_tokens",
        "latency_ms",
        "status",
        "error_code",
        "stream",
        "policy_action",
        "watermark_key_id",
        "label",
    ]
    indexes = {ix["name"]: ix["column_names"] for ix in insp.get_indexes("requests")}
    assert indexes["ix_requests_account_ts"] == ["account_id", "ts"]
    assert indexes["ix_requests_key_ts"] == ["key_id", "ts"]
    assert indexes["ix_requests_ts"] == ["ts"]
    assert "key" not in {c["name"] for c in insp.get_columns("api_keys")}  # only the hash is stored
    assert [c["name"] for c in insp.get_columns("accounts")] == [
        "id",
        "created_at",
        "disabled",
        "rpm",
        "tpm",
        "max_concurrent",
        "daily_tokens",
        "daily_usd",
    ]
    assert [c["name"] for c in insp.get_columns("api_keys")] == [
        "id",
        "account_id",
        "key_hash",
        "prefix",
        "name",
        "created_at",
        "revoked_at",
        "rpm",
        "tpm",
        "max_concurrent",
        "daily_tokens",
        "daily_usd",
        "expires_at",
        "models",
        "rotated_from",
    ]
    engine.dispose()
