"""quota usage on deployments, acting user on events

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 09:00:00
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen here, not imported: a migration must do tomorrow what it does today.
_DEFAULT_CPU = 0.25
_DEFAULT_MEMORY_MB = 256
_DEFAULT_VOLUME_SIZE_GB = 10


def _usage(spec: dict[str, Any]) -> dict[str, int]:
    replicas = spec.get("replicas") or 1
    cpu = spec.get("cpu_request") or _DEFAULT_CPU
    memory = spec.get("memory_request_mb") or _DEFAULT_MEMORY_MB
    storage = spec.get("storage_size_gb") or 0
    storage += sum(volume.get("size_gb") or _DEFAULT_VOLUME_SIZE_GB for volume in spec.get("volumes") or ())
    return {"cpu_millis": round(cpu * 1000) * replicas, "memory_mb": memory * replicas, "storage_gb": storage}


def upgrade() -> None:
    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cpu_millis", sa.BigInteger(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("memory_mb", sa.BigInteger(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("storage_gb", sa.BigInteger(), server_default="0", nullable=False))
    with op.batch_alter_table("deployment_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("actor", sa.String(length=36), nullable=True))

    # Deployments made before quotas existed count against them too.
    deployments = sa.table(
        "deployments",
        sa.column("id", sa.String()),
        sa.column("spec", sa.JSON()),
        sa.column("cpu_millis", sa.BigInteger()),
        sa.column("memory_mb", sa.BigInteger()),
        sa.column("storage_gb", sa.BigInteger()),
        sa.column("deleted_at", sa.DateTime()),
    )
    connection = op.get_bind()
    rows = connection.execute(sa.select(deployments.c.id, deployments.c.spec).where(deployments.c.deleted_at.is_(None)))
    for deployment_id, spec in rows.all():
        connection.execute(deployments.update().where(deployments.c.id == deployment_id).values(**_usage(spec or {})))


def downgrade() -> None:
    with op.batch_alter_table("deployment_events", schema=None) as batch_op:
        batch_op.drop_column("actor")
    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.drop_column("storage_gb")
        batch_op.drop_column("memory_mb")
        batch_op.drop_column("cpu_millis")
