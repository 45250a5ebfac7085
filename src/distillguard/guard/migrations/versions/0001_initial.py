"""Accounts, API keys and the request ledger.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JSONType = sa.JSON().with_variant(JSONB(), "postgresql")
BigIntPK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("account_id", sa.String(128), sa.ForeignKey("accounts.id"), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("name", sa.String(128)),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("revoked_at", sa.Double()),
        sa.Column("rpm", sa.Integer()),
        sa.Column("tpm", sa.Integer()),
        sa.Column("max_concurrent", sa.Integer()),
        sa.Column("daily_tokens", sa.BigInteger()),
    )
    op.create_index("ix_api_keys_account_id", "api_keys", ["account_id"])
    op.create_table(
        "requests",
        sa.Column("id", BigIntPK, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(64), nullable=False, unique=True),
        sa.Column("ts", sa.Double(), nullable=False),
        sa.Column("account_id", sa.String(128)),
        sa.Column("key_id", sa.String(32)),
        sa.Column("client_ip", sa.String(64)),
        sa.Column("model", sa.String(256)),
        sa.Column("request_body", JSONType),
        sa.Column("response_text", sa.Text()),
        sa.Column("prompt_tokens", sa.Integer()),
        sa.Column("completion_tokens", sa.Integer()),
        sa.Column("latency_ms", sa.Double()),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("error_code", sa.String(64)),
        sa.Column("stream", sa.Boolean(), nullable=False),
        sa.Column("policy_action", sa.String(64)),
        sa.Column("watermark_key_id", sa.String(64)),
        sa.Column("label", sa.String(64)),
    )
    op.create_index("ix_requests_account_ts", "requests", ["account_id", "ts"])
    op.create_index("ix_requests_key_ts", "requests", ["key_id", "ts"])
    op.create_index("ix_requests_ts", "requests", ["ts"])


def downgrade() -> None:
    op.drop_table("requests")
    op.drop_table("api_keys")
    op.drop_table("accounts")
