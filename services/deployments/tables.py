"""The tables the deployment service owns: deployments, their event log, the outbox and API keys."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, configure_mappers, mapped_column

from apphosting.db import UTCDateTime

# What a deployment's kept history may hold besides the newest `keep` events (store.trim_events): the
# oldest are forgotten past either bound. A few hundred events of a failing deployment's retries.
HISTORY_BYTES = 256 * 1024
# The records over that bound, as housekeeping looks for them (the partial index below): written as a
# constant, because each database uses a partial index only for a query that states its condition.
HEAVY_HISTORY = f"history_bytes > {HISTORY_BYTES}"
# How many events of each deployment are kept (the newest; ApiOptions.event_history), and the records that
# hold more, as housekeeping looks for them: every revision is one event, so a record keeps
# revision - events_from + 1 of them.
EVENT_HISTORY = 1000
LONG_HISTORY = f"revision - events_from >= {EVENT_HISTORY}"

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL wants 64 bits.
_SEQ = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class DeploymentRow(Base):
    """One deployment: the validated request (spec) and what the platform observed since."""

    __tablename__ = "deployments"
    __table_args__ = (
        # A name is unique among the caller's live deployments; live_name is NULL once it is gone.
        UniqueConstraint("user_id", "live_name", name="uq_deployments_user_live_name"),
        UniqueConstraint("user_id", "request_id", name="uq_deployments_user_request_id"),
        Index("ix_deployments_user_seq", "user_id", "seq"),
        Index("ix_deployments_user_status_seq", "user_id", "status", "seq"),
        Index("ix_deployments_user_region_seq", "user_id", "geographic_region", "seq"),
        # The resync's look for deployments in progress that stopped moving, without a full scan.
        Index("ix_deployments_status_updated", "status", "updated_at"),
        # Housekeeping's look for deleted records past their retention; and the metrics' count of live
        # deployments by status and region, read from this index alone in its order (no table rows, no sort).
        Index("ix_deployments_deleted_status_region", "deleted_at", "status", "geographic_region"),
        # Housekeeping's look for histories over HISTORY_BYTES: it holds only those few records, so the
        # look does not read the whole table, and a write that stays under the bound leaves it alone.
        Index(
            "ix_deployments_heavy_history",
            "id",
            sqlite_where=text(HEAVY_HISTORY),
            postgresql_where=text(HEAVY_HISTORY),
        ),
        # Its look for histories of more than EVENT_HISTORY events, likewise, instead of counting every
        # deployment's events.
        Index(
            "ix_deployments_long_history",
            "id",
            sqlite_where=text(LONG_HISTORY),
            postgresql_where=text(LONG_HISTORY),
        ),
    )

    # Insertion order: the keyset that List pages by, newest first.
    seq: Mapped[int] = mapped_column(_SEQ, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(36), unique=True)
    user_id: Mapped[str] = mapped_column(String(36))
    cluster_id: Mapped[str] = mapped_column(String(36))
    name: Mapped[str] = mapped_column(String(63))
    live_name: Mapped[str | None] = mapped_column(String(63))
    app_type: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(32))
    phase: Mapped[str] = mapped_column(String(64), default="")
    geographic_region: Mapped[str] = mapped_column(String(64))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    request_id: Mapped[str | None] = mapped_column(String(36))
    request_hash: Mapped[str] = mapped_column(String(64))
    revision: Mapped[int] = mapped_column(BigInteger, default=1)

    location_id: Mapped[str | None] = mapped_column(String(63))
    provider: Mapped[str | None] = mapped_column(String(64))
    region: Mapped[str | None] = mapped_column(String(64))
    cluster_status: Mapped[str | None] = mapped_column(String(64))
    cluster_error: Mapped[str | None] = mapped_column(Text)
    endpoint_url: Mapped[str | None] = mapped_column(String(2048))
    error_message: Mapped[str | None] = mapped_column(Text)
    git_path: Mapped[str | None] = mapped_column(String(1024))
    values_yaml: Mapped[str | None] = mapped_column(Text)
    is_adopted: Mapped[bool] = mapped_column(Boolean, default=False)
    source_namespace: Mapped[str | None] = mapped_column(String(63))
    # What the deployment holds against its owner's quotas (services/deployments/quotas.py).
    cpu_millis: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    memory_mb: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    storage_gb: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # The current release (its spec is `spec`), the newest that ran healthy, and the operation in
    # flight (update, scale, stop, start, rollback, promote, migrate, delete; None when at rest).
    release: Mapped[int] = mapped_column(BigInteger, default=1, server_default="1")
    healthy_release: Mapped[int | None] = mapped_column(BigInteger)
    operation: Mapped[str | None] = mapped_column(String(32))
    # The location a placement is pinned to (promote to a location, adopt).
    target_location: Mapped[str | None] = mapped_column(String(63))
    # The deployment this one copies (promote), and the copy this one is being promoted to.
    promoted_from: Mapped[str | None] = mapped_column(String(36))
    promoted_to: Mapped[str | None] = mapped_column(String(36))
    # Set by a rollback: automatic image updates wait until an update sets an image_* policy field.
    image_updates_paused: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    # The scheduler's explanation of the placement (a PlacementExplanation as JSON).
    placement: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Bytes it stores (counted in its owner's `stored_mb` quota): the record, and its kept history.
    record_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    history_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # The revision of its oldest kept event: the events before it were folded into that one (trim_events).
    events_from: Mapped[int] = mapped_column(BigInteger, default=1, server_default="1")

    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class EventRow(Base):
    """One applied change of a deployment, kept so a watch can resume from any revision it holds."""

    __tablename__ = "deployment_events"
    __table_args__ = (
        UniqueConstraint("deployment_id", "revision", name="uq_deployment_events_revision"),
        UniqueConstraint("event_id", name="uq_deployment_events_event_id"),
    )

    seq: Mapped[int] = mapped_column(_SEQ, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(64))
    deployment_id: Mapped[str] = mapped_column(ForeignKey("deployments.id", ondelete="CASCADE"))
    revision: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(32))
    phase: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(128))
    simulated: Mapped[bool] = mapped_column(Boolean, default=False)
    final: Mapped[bool] = mapped_column(Boolean, default=False)
    time: Mapped[datetime] = mapped_column(UTCDateTime())
    # The user who asked for this change (create, delete, retry); NULL for what the platform reported.
    actor: Mapped[str | None] = mapped_column(String(36))
    # The operation the change belongs to, and the release it is about.
    operation: Mapped[str | None] = mapped_column(String(32))
    release: Mapped[int | None] = mapped_column(BigInteger)
    # The observed fields this change set, with their values after it (convert.OBSERVED); the
    # oldest kept event holds them all. The spec is the record's: a resumed watch rebuilds the
    # Deployment as of this revision from the spec and these changes folded in revision order.
    changes: Mapped[dict[str, Any]] = mapped_column(JSON)


class ReleaseRow(Base):
    """One accepted version of a deployment's spec: what rollback re-applies and audit reads."""

    __tablename__ = "deployment_releases"
    __table_args__ = (UniqueConstraint("deployment_id", "number", name="uq_deployment_releases_number"),)

    seq: Mapped[int] = mapped_column(_SEQ, primary_key=True, autoincrement=True)
    deployment_id: Mapped[str] = mapped_column(ForeignKey("deployments.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(BigInteger)
    # None while this is the deployment's current release: its spec is the record's, stored once, and
    # moves here when a newer release replaces it (DeploymentStore.with_specs fills it in for readers).
    spec: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # create, update, scale, rollback, rollback-automatic, adopt, promote.
    operation: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    healthy: Mapped[bool] = mapped_column(Boolean, default=False)
    rollback_of: Mapped[int | None] = mapped_column(BigInteger)


class OutboxRow(Base):
    """A bus message written in the same transaction as the change it announces; the relay sends it.

    Deleted once JetStream stored it: the stream holds it from then on.
    """

    __tablename__ = "outbox"

    seq: Mapped[int] = mapped_column(_SEQ, primary_key=True, autoincrement=True)
    # Also the Nats-Msg-Id, so a resend after a crash is dropped by JetStream.
    id: Mapped[str] = mapped_column(String(36), unique=True)
    subject: Mapped[str] = mapped_column(String(255))
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    # Message headers sent with it: the trace (W3C traceparent) and deployment it was written in.
    headers: Mapped[dict[str, str] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ApiKeyRow(Base):
    """One API key: never the key itself, only its SHA-256 (services/deployments/api_keys.py says why)."""

    __tablename__ = "api_keys"
    __table_args__ = (
        # Every authenticated call with a key looks its hash up.
        UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
        # ListApiKeys: the caller's keys, newest first.
        Index("ix_api_keys_user_seq", "user_id", "seq"),
    )

    # Insertion order: the keyset ListApiKeys pages by, newest first.
    seq: Mapped[int] = mapped_column(_SEQ, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(36), unique=True)
    user_id: Mapped[str] = mapped_column(String(36))
    name: Mapped[str] = mapped_column(String(100))
    # `ahk_` and the secret's first 8 characters: tells keys apart, reveals 48 of its 256 bits.
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64))
    read_only: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


# Every mapped class of this service is above: their mappers are set up now, so a row can be made
# without its constructor (store._plain) before any has been constructed or queried.
configure_mappers()
