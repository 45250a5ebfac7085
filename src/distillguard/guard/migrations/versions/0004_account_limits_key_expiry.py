"""Limits per account; key expiry, rotation and model allowlists; a daily dollar budget.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

JSONType = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    # Plain ADD COLUMNs of nullable columns: no table rebuild on SQLite, no rewrite on PostgreSQL.
    op.add_column("accounts", sa.Column("rpm", sa.Integer(), nullable=True))
    op.add_column("accounts", sa.Column("tpm", sa.Integer(), nullable=True))
    op.add_column("accounts", sa.Column("max_concurrent", sa.Integer(), nullable=True))
    op.add_column("accounts", sa.Column("daily_tokens", sa.BigInteger(), nullable=True))
    op.add_column("accounts", sa.Column("daily_usd", sa.Double(), nullable=True))
    op.add_column("api_keys", sa.Column("daily_usd", sa.Double(), nullable=True))
    op.add_column("api_keys", sa.Column("expires_at", sa.Double(), nullable=True))
    op.add_column("api_keys", sa.Column("models", JSONType, nullable=True))
    op.add_column("api_keys", sa.Column("rotated_from", sa.String(32), nullable=True))


def downgrade() -> None:
    for column in ("rotated_from", "models", "expires_at", "daily_usd"):
        op.drop_column("api_keys", column)
    for column in ("daily_usd", "daily_tokens", "max_concurrent", "tpm", "rpm"):
        op.drop_column("accounts", column)
