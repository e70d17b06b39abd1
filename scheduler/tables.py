"""The scheduler's own tables: capacity reservations per deployment and their totals per location."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import BigInteger, String
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


class LocationUsage(Base):
    """What all reservations on one location hold, kept in the transaction that changes any of them.

    The ledger reads these rows instead of summing every reservation, so placing costs the same with
    a hundred deployments as with a million. Cpu is in millicores, so that the totals are exact
    integers that adding and releasing cannot drift.
    """

    __tablename__ = "scheduler_location_usage"

    location_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    cpu_millis: Mapped[int] = mapped_column(BigInteger)
    memory_mb: Mapped[int] = mapped_column(BigInteger)
    storage_gb: Mapped[int] = mapped_column(BigInteger)
    vclusters: Mapped[int] = mapped_column(BigInteger)


class LedgerClock(Base):
    """One row whose tick every transaction that changes a reservation advances, in commit order.

    A ledger keeps the totals it read in memory with the tick they were read at, and reads them
    again only when the tick moved past what its own writes account for.
    """

    __tablename__ = "scheduler_ledger_clock"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    tick: Mapped[int] = mapped_column(BigInteger)
