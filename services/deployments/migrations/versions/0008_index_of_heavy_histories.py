"""a partial index of the records whose history is over HISTORY_BYTES, for housekeeping's look

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 06:15:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# tables.HEAVY_HISTORY as of this revision (256 KiB): a migration keeps the schema it made.
_HEAVY = "history_bytes > 262144"


def upgrade() -> None:
    op.create_index(
        "ix_deployments_heavy_history",
        "deployments",
        ["id"],
        sqlite_where=sa.text(_HEAVY),
        postgresql_where=sa.text(_HEAVY),
    )


def downgrade() -> None:
    op.drop_index("ix_deployments_heavy_history", table_name="deployments")
