"""each record's oldest kept event, and a partial index of the records that keep more than EVENT_HISTORY

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30 08:15:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# tables.LONG_HISTORY as of this revision (1,000 events): a migration keeps the schema it made.
_LONG = "revision - events_from >= 1000"


def upgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.add_column(sa.Column("events_from", sa.BigInteger(), nullable=False, server_default="1"))
    # Records trimmed before this revision no longer hold their first event.
    op.execute(
        "UPDATE deployments SET events_from = "
        "(SELECT min(e.revision) FROM deployment_events e WHERE e.deployment_id = deployments.id) "
        "WHERE NOT EXISTS "
        "(SELECT 1 FROM deployment_events e WHERE e.deployment_id = deployments.id AND e.revision = 1) "
        "AND EXISTS (SELECT 1 FROM deployment_events e WHERE e.deployment_id = deployments.id)"
    )
    op.create_index(
        "ix_deployments_long_history",
        "deployments",
        ["id"],
        sqlite_where=sa.text(_LONG),
        postgresql_where=sa.text(_LONG),
    )


def downgrade() -> None:
    op.drop_index("ix_deployments_long_history", table_name="deployments")
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("events_from")
