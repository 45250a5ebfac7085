"""Verdicts name the monitor that recorded them: the lease holder (``guard/lease.py``).

With the in-process monitor of N replicas (``serve --detect CAL``) and ``distillguard monitor``
contending for one lease, an audit must be able to say which process reached each online
verdict, and check that only one wrote at a time. Null for admin and imported verdicts, and for
those written before this revision.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("verdicts", sa.Column("holder", sa.String(256), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("verdicts") as batch:
        batch.drop_column("holder")
