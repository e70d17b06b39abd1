"""The capacity ledger: reservations in the database, so that concurrent placements never overbook."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from sqlalchemy import delete, func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from apphosting import db
from apphosting.locations import LocationConfig
from scheduler.placement import Demand, Placed, Placement, Placer, Refused
from scheduler.tables import Reservation

# Key of the PostgreSQL advisory lock that serialises reservations across scheduler processes
# (an arbitrary constant; it only has to differ from other advisory locks on the same database).
_ADVISORY_LOCK_KEY = 0x61707068_6F737401  # "apphost" + 1

_SUPPORTED_DIALECTS = frozenset({"sqlite", "postgresql"})

MIGRATIONS = "scheduler:migrations"
VERSION_TABLE = "alembic_version_scheduler"


class Ledger:
    """Reserves and releases capacity of locations for deployments, in the scheduler's tables."""

    def __init__(self, engine: AsyncEngine, locations: Sequence[LocationConfig]) -> None:
        dialect = engine.dialect.name
        if dialect not in _SUPPORTED_DIALECTS:
            # Reservations would be checked and written without a cross-process lock: overbooking.
            raise ValueError(f"the ledger needs SQLite or PostgreSQL, not {dialect}")
        self._engine = engine
        self._sqlite = dialect == "sqlite"
        self._placer = Placer(locations)
        self._locations = {location.id: location for location in locations}
        # The database lock already serialises writers; this one keeps a process's own coroutines
        # from queueing on it, which on SQLite would block pool threads in the busy handler.
        self._lock = asyncio.Lock()

    async def create_tables(self) -> None:
        """Brings the scheduler's tables up to their newest migration."""
        await db.upgrade(self._engine, MIGRATIONS, VERSION_TABLE)

    async def location_of(self, deployment_id: str) -> str | None:
        """Where the deployment holds capacity, if it does."""
        async with self._engine.connect() as conn:
            found: str | None = await conn.scalar(
                select(Reservation.location_id).where(Reservation.deployment_id == deployment_id)
            )
            return found

    async def reserve(self, deployment_id: str, geographic_region: str, demand: Demand) -> Placement:
        """Places the demand and holds the capacity; a deployment already holding some gets the same place.

        Reading what is used, choosing and writing happen in one transaction that holds the
        ledger's write lock, so neither another coroutine nor another scheduler process can place
        against the same free capacity in between.
        """
        async with self._exclusive() as conn:
            held = await conn.scalar(select(Reservation.location_id).where(Reservation.deployment_id == deployment_id))
            if held is not None:
                location = self._locations.get(held)
                if location is None:
                    return Refused(
                        f"deployment {deployment_id} holds capacity on location {held!r}, which is no longer configured"
                    )
                return Placed(location)
            placement = self._placer.place(await _used(conn), geographic_region, demand)
            if isinstance(placement, Placed):
                await conn.execute(
                    insert(Reservation).values(
                        deployment_id=deployment_id,
                        location_id=placement.location.id,
                        cpu=demand.cpu,
                        memory_mb=demand.memory_mb,
                        storage_gb=demand.storage_gb,
                        vclusters=demand.vclusters,
                    )
                )
            return placement

    async def release(self, deployment_id: str) -> bool:
        """Frees the deployment's capacity; False when it held none (already released)."""
        # No ledger lock: freeing capacity cannot overbook, and a reservation that read the usage
        # just before this commit only errs on the safe side.
        async with self._engine.begin() as conn:
            result = await conn.execute(delete(Reservation).where(Reservation.deployment_id == deployment_id))
        return result.rowcount > 0

    async def used(self) -> dict[str, Demand]:
        """Capacity held per location id; locations holding nothing are absent."""
        async with self._engine.connect() as conn:
            return await _used(conn)

    @asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[AsyncConnection]:
        """A transaction that no other ledger's exclusive transaction runs alongside, in any process."""
        async with self._lock, self._engine.connect() as conn, conn.begin():
            if self._sqlite:
                # The sqlite3 driver only opens a (deferred) transaction at the first write, so the
                # read of used capacity would see a snapshot another process can write past.
                # BEGIN IMMEDIATE takes the write lock before that read.
                await conn.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                # Released at commit or rollback; read committed then shows the previous holder's rows.
                await conn.execute(select(func.pg_advisory_xact_lock(_ADVISORY_LOCK_KEY)))
            yield conn


async def _used(conn: AsyncConnection) -> dict[str, Demand]:
    rows = await conn.execute(
        select(
            Reservation.location_id,
            func.sum(Reservation.cpu),
            func.sum(Reservation.memory_mb),
            func.sum(Reservation.storage_gb),
            func.sum(Reservation.vclusters),
        ).group_by(Reservation.location_id)
    )
    return {
        location_id: Demand(cpu=float(cpu), memory_mb=int(memory), storage_gb=int(storage), vclusters=int(vcs))
        for location_id, cpu, memory, storage, vcs in rows
    }
