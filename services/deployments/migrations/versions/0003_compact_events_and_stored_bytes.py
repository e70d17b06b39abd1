"""events store what changed instead of a snapshot; stored bytes per deployment; sent outbox rows go

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 19:00:00
"""

import json
from collections.abc import Sequence
from datetime import UTC
from typing import Any

import sqlalchemy as sa
from alembic import op
from google.protobuf.message import Message

from apphosting.v1 import deployments_pb2 as pb

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen here, not imported: a migration must do tomorrow what it does today.
_OPTIONALS = (
    "values_yaml",
    "git_path",
    "endpoint_url",
    "error_message",
    "source_namespace",
    "provider",
    "region",
    "cluster_status",
    "cluster_error",
    "location_id",
)
_RECORD_OVERHEAD = 512
_EVENT_OVERHEAD = 128

_deployments = sa.table(
    "deployments",
    sa.column("id", sa.String()),
    sa.column("spec", sa.JSON()),
    sa.column("name", sa.String()),
    sa.column("geographic_region", sa.String()),
    sa.column("request_hash", sa.String()),
    sa.column("request_id", sa.String()),
    sa.column("record_bytes", sa.BigInteger()),
    sa.column("history_bytes", sa.BigInteger()),
)
_events = sa.table(
    "deployment_events",
    sa.column("seq", sa.BigInteger()),
    sa.column("deployment_id", sa.String()),
    sa.column("revision", sa.BigInteger()),
    sa.column("event_id", sa.String()),
    sa.column("message", sa.Text()),
    sa.column("source", sa.String()),
    sa.column("actor", sa.String()),
    sa.column("snapshot", sa.LargeBinary()),
    sa.column("changes", sa.JSON()),
)


def _observed(snapshot: bytes) -> dict[str, Any]:
    """The observed fields of a stored Deployment snapshot, as events now store them."""
    deployment = pb.Deployment.FromString(snapshot)
    values: dict[str, Any] = {
        "status": pb.DeploymentStatus.Name(deployment.status).removeprefix("DEPLOYMENT_STATUS_").lower(),
        "phase": deployment.phase,
        "updated_at": deployment.updated_at.ToDatetime(tzinfo=UTC).isoformat(),
        "deleted_at": deployment.deleted_at.ToDatetime(tzinfo=UTC).isoformat()
        if deployment.HasField("deleted_at")
        else None,
        "is_adopted": deployment.is_adopted,
    }
    message: Message = deployment  # fields named at run time
    for name in _OPTIONALS:
        values[name] = getattr(deployment, name) if message.HasField(name) else None
    return values


def _bytes(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode())
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


def upgrade() -> None:
    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("record_bytes", sa.BigInteger(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("history_bytes", sa.BigInteger(), server_default="0", nullable=False))
    with op.batch_alter_table("deployment_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("changes", sa.JSON(), nullable=True))

    # Each deployment's oldest kept event becomes the base; the later ones keep only what changed.
    connection = op.get_bind()
    for deployment in connection.execute(sa.select(_deployments)).mappings().all():
        events = connection.execute(
            sa.select(_events).where(_events.c.deployment_id == deployment["id"]).order_by(_events.c.revision)
        ).mappings()
        state: dict[str, Any] = {}
        history = 0
        for event in events.all():
            observed = _observed(event["snapshot"])
            changes = {name: value for name, value in observed.items() if name not in state or state[name] != value}
            state = observed
            texts = (event["event_id"], event["message"], event["source"], event["actor"] or "")
            history += _EVENT_OVERHEAD + _bytes(changes) + sum(map(_bytes, texts))
            connection.execute(_events.update().where(_events.c.seq == event["seq"]).values(changes=changes))
        names = ("name", "geographic_region", "request_hash", "request_id")
        record = _RECORD_OVERHEAD + _bytes(deployment["spec"]) + sum(_bytes(deployment[n] or "") for n in names)
        record += sum(_bytes(value) for value in state.values() if isinstance(value, str))
        connection.execute(
            _deployments.update()
            .where(_deployments.c.id == deployment["id"])
            .values(record_bytes=record, history_bytes=history)
        )

    with op.batch_alter_table("deployment_events", schema=None) as batch_op:
        batch_op.alter_column("changes", existing_type=sa.JSON(), nullable=False)
        batch_op.drop_column("snapshot")
    # JetStream has the sent rows; from now on a row goes as soon as it is stored there.
    op.execute("DELETE FROM outbox WHERE sent_at IS NOT NULL")
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_index("ix_outbox_unsent")
        batch_op.drop_column("sent_at")


def downgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index("ix_outbox_unsent", ["sent_at", "seq"], unique=False)
    # The snapshots cannot be rebuilt here: the history goes, and watches start again from the current state.
    op.execute("DELETE FROM deployment_events")
    with op.batch_alter_table("deployment_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("snapshot", sa.LargeBinary(), nullable=False))
        batch_op.drop_column("changes")
    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.drop_column("history_bytes")
        batch_op.drop_column("record_bytes")
