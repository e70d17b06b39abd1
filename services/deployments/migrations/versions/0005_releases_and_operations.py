"""releases of each deployment's spec, and the desired-state columns of day-2 operations

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 22:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    # Plain ADD COLUMNs, not a batch copy of the tables: on SQLite a batch drops the old deployments
    # table, and with foreign keys on, that drop deletes every event (ON DELETE CASCADE).
    op.add_column("deployments", sa.Column("release", sa.BigInteger(), nullable=False, server_default="1"))
    op.add_column("deployments", sa.Column("healthy_release", sa.BigInteger(), nullable=True))
    op.add_column("deployments", sa.Column("operation", sa.String(32), nullable=True))
    op.add_column("deployments", sa.Column("target_location", sa.String(63), nullable=True))
    op.add_column("deployments", sa.Column("promoted_from", sa.String(36), nullable=True))
    op.add_column("deployments", sa.Column("promoted_to", sa.String(36), nullable=True))
    op.add_column(
        "deployments", sa.Column("image_updates_paused", sa.Boolean(), nullable=False, server_default=sa.false())
    )
    op.add_column("deployments", sa.Column("placement", sa.JSON(), nullable=True))
    op.add_column("deployment_events", sa.Column("operation", sa.String(32), nullable=True))
    op.add_column("deployment_events", sa.Column("release", sa.BigInteger(), nullable=True))
    op.create_table(
        "deployment_releases",
        sa.Column("seq", _SEQ, primary_key=True, autoincrement=True),
        sa.Column("deployment_id", sa.String(36), sa.ForeignKey("deployments.id", ondelete="CASCADE"), nullable=False),
        sa.Column("number", sa.BigInteger(), nullable=False),
        # NULL for the current release: its spec is the record's, stored once.
        sa.Column("spec", sa.JSON(), nullable=True),
        sa.Column("operation", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(64), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("healthy", sa.Boolean(), nullable=False),
        sa.Column("rollback_of", sa.BigInteger(), nullable=True),
        sa.UniqueConstraint("deployment_id", "number", name="uq_deployment_releases_number"),
    )
    # Every existing deployment's spec is its release 1 (the current one: its spec stays the record's);
    # one that runs ran it healthy.
    op.execute(
        "INSERT INTO deployment_releases (deployment_id, number, operation, actor, reason, created_at, healthy) "
        "SELECT id, 1, 'create', user_id, '', created_at, status = 'running' FROM deployments"
    )
    op.execute("UPDATE deployments SET healthy_release = 1 WHERE status = 'running'")


def downgrade() -> None:
    op.drop_table("deployment_releases")
    with op.batch_alter_table("deployment_events") as table:
        table.drop_column("release")
        table.drop_column("operation")
    with op.batch_alter_table("deployments") as table:
        for column in (
            "placement",
            "image_updates_paused",
            "promoted_to",
            "promoted_from",
            "target_location",
            "operation",
            "healthy_release",
            "release",
        ):
            table.drop_column(column)
