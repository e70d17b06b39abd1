"""The scheduler's own tables: capacity reservations per deployment."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from apphosting.db import UTCDateTime


class Base(DeclarativeBase):
    """Metadata of the scheduler's tables, separate from those of the other services."""


class Reservation(Base):
    """Capacity of one location held by one deployment, from placement until it is torn down."""

    __tablename__ = "scheduler_reservations"

    deployment_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    location_id: Mapped[str] = mapped_column(String(63), index=True)
    cpu: Mapped[float]
    memory_mb: Mapped[int]
    storage_gb: Mapped[int]
    vclusters: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=lambda: datetime.now(UTC))
