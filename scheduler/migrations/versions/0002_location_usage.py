"""location usage totals and the ledger clock

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 01:45:00.000000
"""

import math
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    clock = op.create_table(
        "scheduler_ledger_clock",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("tick", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.bulk_insert(clock, [{"id": 1, "tick": 0}])
    usage = op.create_table(
        "scheduler_location_usage",
        sa.Column("location_id", sa.String(length=63), nullable=False),
        sa.Column("cpu_millis", sa.BigInteger(), nullable=False),
        sa.Column("memory_mb", sa.BigInteger(), nullable=False),
        sa.Column("storage_gb", sa.BigInteger(), nullable=False),
        sa.Column("vclusters", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("location_id"),
    )
    # The totals of the reservations already held, each one's cpu rounded up to millicores as the
    # ledger rounds a reservation it adds or takes away (a migration keeps its own copy of the rule).
    reservations = sa.table(
        "scheduler_reservations",
        sa.column("location_id", sa.String()),
        sa.column("cpu", sa.Double()),
        sa.column("memory_mb", sa.Integer()),
        sa.column("storage_gb", sa.Integer()),
        sa.column("vclusters", sa.Integer()),
    )
    totals: dict[str, list[int]] = {}
    for location_id, cpu, memory_mb, storage_gb, vclusters in op.get_bind().execute(sa.select(reservations)):
        total = totals.setdefault(location_id, [0, 0, 0, 0])
        for index, value in enumerate((math.ceil(round(cpu * 1000, 6)), memory_mb, storage_gb, vclusters)):
            total[index] += int(value)
    if totals:
        op.bulk_insert(
            usage,
            [
                {"location_id": location_id, "cpu_millis": c, "memory_mb": m, "storage_gb": s, "vclusters": v}
                for location_id, (c, m, s, v) in totals.items()
            ],
        )


def downgrade() -> None:
    op.drop_table("scheduler_location_usage")
    op.drop_table("scheduler_ledger_clock")
