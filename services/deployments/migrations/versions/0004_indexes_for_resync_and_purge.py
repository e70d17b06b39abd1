"""indexes for the resync (deployments in progress that stopped moving) and the purge of deleted records

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 19:40:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_deployments_status_updated", "deployments", ["status", "updated_at"])
    op.create_index("ix_deployments_deleted_at", "deployments", ["deleted_at"])


def downgrade() -> None:
    op.drop_index("ix_deployments_deleted_at", table_name="deployments")
    op.drop_index("ix_deployments_status_updated", table_name="deployments")
