"""the index of deletion times also holds status and region, so live deployments are counted from it alone

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 20:40:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_deployments_deleted_status_region", "deployments", ["deleted_at", "status", "geographic_region"]
    )
    op.drop_index("ix_deployments_deleted_at", table_name="deployments")


def downgrade() -> None:
    op.create_index("ix_deployments_deleted_at", "deployments", ["deleted_at"])
    op.drop_index("ix_deployments_deleted_status_region", table_name="deployments")
