"""capacity reservations

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-28 10:42:11.595590
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "scheduler_reservations",
        sa.Column("deployment_id", sa.String(length=36), nullable=False),
        sa.Column("location_id", sa.String(length=63), nullable=False),
        sa.Column("cpu", sa.Double(), nullable=False),
        sa.Column("memory_mb", sa.Integer(), nullable=False),
        sa.Column("storage_gb", sa.Integer(), nullable=False),
        sa.Column("vclusters", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("deployment_id"),
    )
    with op.batch_alter_table("scheduler_reservations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_scheduler_reservations_location_id"), ["location_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("scheduler_reservations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_scheduler_reservations_location_id"))

    op.drop_table("scheduler_reservations")
