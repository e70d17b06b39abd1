"""The scheduler's own tables: capacity reservations per deployment."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import DateTime, Dialect, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class _UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp on every engine: SQLite stores none, so UTC is put back on read."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("timestamps must be timezone-aware")
        # SQLite keeps only the wall time, so every engine gets UTC.
        return None if value is None else value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


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
    created_at: Mapped[datetime] = mapped_column(_UtcDateTime(), default=lambda: datetime.now(UTC))
