"""Leases: one holder at a time for a job that must run once per ledger (``distillguard monitor``).

A row per job: who holds it and a heartbeat counter the holder bumps every few seconds. A
contender takes the lease over only after it has watched the counter stand still for the lease's
time-to-live on its own clock, so no two machines' clocks are compared. See
``guard/detector_service.py``'s :class:`Lease`.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(256), nullable=False),
        sa.Column("beat", sa.BigInteger(), nullable=False),
        sa.Column("ttl_s", sa.Double(), nullable=False),
        sa.Column("acquired_at", sa.Double(), nullable=False),
        sa.Column("renewed_at", sa.Double(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("leases")
