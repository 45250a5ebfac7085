"""Verdicts: detection results per account, which drive the policy ladder.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

JSONType = sa.JSON().with_variant(JSONB(), "postgresql")
BigIntPK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "verdicts",
        sa.Column("id", BigIntPK, primary_key=True, autoincrement=True),
        sa.Column("ts", sa.Double(), nullable=False),
        sa.Column("account_id", sa.String(128), nullable=False),
        sa.Column("level", sa.Integer(), nullable=False),
        sa.Column("score", sa.Double(), nullable=True),
        sa.Column("reasons", JSONType, nullable=True),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=True),
    )
    op.create_index("ix_verdicts_account_id", "verdicts", ["account_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_verdicts_account_id", table_name="verdicts")
    op.drop_table("verdicts")
