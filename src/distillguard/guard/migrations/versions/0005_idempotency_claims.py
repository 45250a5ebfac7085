"""Idempotency-Key claims: a pending row (``response`` NULL) is written before generating.

Concurrent retries with one key then find the claim and wait (409 idempotency_in_progress)
instead of each running and charging a generation; the primary key (account_id, key) makes
the claim atomic across replicas. See ``Guard.replay``.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

JSONType = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    # batch: SQLite cannot ALTER a column's nullability in place (it copies the table).
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.alter_column("response", existing_type=JSONType, nullable=True)


def downgrade() -> None:
    op.execute("DELETE FROM idempotency_keys WHERE response IS NULL")  # claims in flight
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.alter_column("response", existing_type=JSONType, nullable=False)
