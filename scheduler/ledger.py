"""The capacity ledger: reservations in the database, so that concurrent placements never overbook."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from sqlalchemy import delete, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from apphosting import db
from apphosting.batching import Batcher
from apphosting.locations import LocationConfig
from apphosting.v1 import deployments_pb2
from scheduler.placement import Demand, Explained, Placed, Placement, Placer, Refused, Usage
from scheduler.tables import LedgerClock, LocationUsage, Reservation

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
        # The totals as of a tick of the ledger clock, kept between placements: read again only when
        # a transaction this ledger did not account for (another process's) has moved the clock.
        self._cache: Usage | None = None
        self._cache_tick = -1
        # Placements waiting for the group transaction after the one being written (group commit).
        self._groups: Batcher[_Asking, Explained] = Batcher(self._place_group, most=_GROUP_MOST)
        # Holdings asked for at one moment, read together in one statement.
        self._lookups: Batcher[str, tuple[str, Demand] | None] = Batcher(self._holdings, most=_GROUP_MOST)

    async def create_tables(self) -> None:
        """Brings the scheduler's tables up to their newest migration."""
        await db.upgrade(self._engine, MIGRATIONS, VERSION_TABLE)

    async def location_of(self, deployment_id: str) -> str | None:
        """Where the deployment holds capacity, if it does."""
        held = await self.holding(deployment_id)
        return held[0] if held is not None else None

    async def reserve(
        self, deployment_id: str, geographic_region: str, demand: Demand, pinned: str | None = None
    ) -> Placement:
        """Places the demand and holds the capacity; see place()."""
        return (await self.place(deployment_id, geographic_region, demand, pinned)).placement

    async def place(
        self, deployment_id: str, geographic_region: str, demand: Demand, pinned: str | None = None
    ) -> Explained:
        """Places the demand (only on `pinned` when given) and holds the capacity, with the explanation.

        A deployment already holding some gets the same place. Reading what is used, choosing and
        writing happen in one transaction that holds the ledger's write lock, so neither another
        coroutine nor another scheduler process can place against the same free capacity in between.
        Placements asked for while a group is being written wait and are placed together in the next
        transaction (group commit), each against what the ones before it took.
        """
        return await self._groups.ask(
            _Asking(deployment_id, demand, geographic_region=geographic_region, pinned=pinned)
        )

    async def _place_group(self, group: Sequence[_Asking]) -> list[Explained]:
        """Places a group in order in one transaction, as one placement after another would: each
        against the totals with the ones before it counted."""
        answers: list[Explained] = []
        # Per location and sign (1: adds, -1: takes away), what the group changes in its totals, cpu
        # in millicores: exact integers, each sum of non-negative amounts.
        counted: dict[tuple[str, int], list[int]] = {}
        tick = -1

        def count(location_id: str, demand: Demand, sign: int) -> None:
            # The kept totals take it now, for the next in the group; dropped if the group fails.
            used.add(location_id, _counted(demand), sign)
            total = counted.setdefault((location_id, sign), [0, 0, 0, 0])
            for index, amount in enumerate(_amounts(demand)):
                total[index] += amount

        try:
            async with self._exclusive() as conn:
                used = await self._current(conn)
                # A set reservation keeps a concurrent release from deleting the holding it replaces.
                locking = any(asking.location_id is not None for asking in group)
                held = await _held_all(conn, [asking.deployment_id for asking in group], lock=locking)
                inserted: list[dict[str, object]] = []
                for asking in group:
                    holding = held.get(asking.deployment_id)
                    if asking.location_id is None and holding is not None:
                        answers.append(
                            self._placed_already(asking.deployment_id, asking.geographic_region, used, *holding)
                        )
                        continue
                    if asking.location_id is None:
                        explained = self._placer.explain(used, asking.geographic_region, asking.demand, asking.pinned)
                    else:
                        explained = self._check(used, holding, asking.location_id, asking.demand)
                    answers.append(explained)
                    if not isinstance(explained.placement, Placed):
                        continue
                    location_id = explained.placement.location.id
                    held[asking.deployment_id] = (location_id, asking.demand)
                    if holding is None:
                        inserted.append(
                            dict(deployment_id=asking.deployment_id, location_id=location_id, **_columns(asking.demand))
                        )
                    else:
                        await conn.execute(
                            update(Reservation)
                            .where(Reservation.deployment_id == asking.deployment_id)
                            .values(location_id=location_id, **_columns(asking.demand))
                        )
                        count(*holding, -1)
                    count(location_id, asking.demand, 1)
                if inserted:
                    await conn.execute(insert(Reservation), inserted)
                if counted:
                    tick = await self._count(
                        conn,
                        *(
                            (location_id, (cpu, memory, storage, vcs), sign)
                            for (location_id, sign), (cpu, memory, storage, vcs) in counted.items()
                        ),
                    )
        except BaseException:
            if counted:
                self._cache = None
            raise
        if counted:
            # The totals kept in memory count the group already; they stay only if nothing else
            # moved the clock since they were read.
            if self._cache is not None and tick == self._cache_tick + 1:
                self._cache_tick = tick
            else:
                self._cache = None
        return answers

    def _placed_already(
        self, deployment_id: str, geographic_region: str, used: Mapping[str, Demand], location_id: str, holds: Demand
    ) -> Explained:
        """A redelivered request: where the deployment holds capacity, explained as if placed afresh."""
        location = self._locations.get(location_id)
        if location is None:
            message = (
                f"deployment {deployment_id} holds capacity on location {location_id!r}, which is no longer configured"
            )
            return Explained(Refused(message), deployments_pb2.PlacementExplanation(refusal=message))
        explained = self._placer.explain(_without(used, location_id, holds), geographic_region, holds, location_id)
        explanation = explained.explanation
        # It holds the room already, whatever the location's health or capacity became since.
        explanation.chosen_location_id = location_id
        explanation.refusal = ""
        for candidate in explanation.candidates:
            if candidate.location_id == location_id:
                candidate.chosen = True
                candidate.reason = ""
        return Explained(Placed(location), explanation)

    async def explain(self, geographic_region: str, demand: Demand, pinned: str | None = None) -> Explained:
        """Where the demand would be placed now, and why; holds nothing."""
        return self._placer.explain(await self.used(), geographic_region, demand, pinned)

    async def check(self, deployment_id: str, location_id: str, demand: Demand) -> Explained:
        """Whether the location has room for the demand, counting what the deployment holds there as free."""
        async with self._engine.connect() as conn:
            return self._check(await self._used(conn), await _held(conn, deployment_id), location_id, demand)

    async def set_reservation(self, deployment_id: str, location_id: str, demand: Demand) -> Explained:
        """check(), and when it fits, makes the deployment hold exactly the demand on the location.

        Set, not add: asking twice holds it once. Under the ledger's write lock, in the group
        transaction placements share, so that concurrent requests never together take more than
        the location has.
        """
        return await self._groups.ask(_Asking(deployment_id, demand, location_id=location_id))

    def _check(
        self, used: Mapping[str, Demand], held: tuple[str, Demand] | None, location_id: str, demand: Demand
    ) -> Explained:
        if held is not None and held[0] == location_id:
            used = _without(used, *held)
        location = self._locations.get(location_id)
        region = location.geographic_region if location is not None else ""
        return self._placer.explain(used, region, demand, location_id)

    async def stop(self, deployment_id: str) -> bool:
        """A stopped deployment keeps its storage and vCluster slot but frees its cpu and memory.

        False when it holds nothing. Idempotent. Under the ledger's write lock, since the location's
        totals lose what the reservation held before, which must not change in between.
        """
        async with self._exclusive() as conn:
            held = await _held(conn, deployment_id, lock=True)
            if held is None:
                return False
            location_id, holds = held
            await conn.execute(
                update(Reservation).where(Reservation.deployment_id == deployment_id).values(cpu=0.0, memory_mb=0)
            )
            freed: _Change = (location_id, (cpu_millis(holds.cpu), holds.memory_mb, 0, 0), -1)
            tick = await self._count(conn, freed)
        self._advance(tick, [freed])
        return True

    async def holding(self, deployment_id: str) -> tuple[str, Demand] | None:
        """The location and the capacity the deployment holds, if it does.

        The lookups asked at one moment are read together, in one statement.
        """
        return await self._lookups.ask(deployment_id)

    async def _holdings(self, deployment_ids: Sequence[str]) -> list[tuple[str, Demand] | None]:
        async with self._engine.connect() as conn:
            held = await _held_all(conn, deployment_ids)
        return [held.get(deployment_id) for deployment_id in deployment_ids]

    async def release(self, deployment_id: str) -> bool:
        """Frees the deployment's capacity; False when it held none (already released)."""
        # No ledger lock: freeing capacity cannot overbook, and a reservation that read the usage
        # just before this commit only errs on the safe side. The delete returns what it freed, so
        # of two concurrent releases only one takes it off the location's totals.
        async with self._engine.begin() as conn:
            freed = (
                await conn.execute(
                    delete(Reservation)
                    .where(Reservation.deployment_id == deployment_id)
                    .returning(
                        Reservation.location_id,
                        Reservation.cpu,
                        Reservation.memory_mb,
                        Reservation.storage_gb,
                        Reservation.vclusters,
                    )
                )
            ).first()
            if freed is None:
                return False
            location_id, cpu, memory, storage, vcs = freed
            holds = Demand(cpu=float(cpu), memory_mb=int(memory), storage_gb=int(storage), vclusters=int(vcs))
            change: _Change = (location_id, _amounts(holds), -1)
            tick = await self._count(conn, change)
        self._advance(tick, [change])
        return True

    async def used(self) -> Usage:
        """Capacity held per location id; locations holding nothing are absent."""
        async with self._engine.connect() as conn:
            return await self._used(conn)

    async def _used(self, conn: AsyncConnection) -> Usage:
        """The locations' totals: one row per location holding capacity, however many deployments hold it."""
        rows = await conn.execute(
            select(
                LocationUsage.location_id,
                LocationUsage.cpu_millis,
                LocationUsage.memory_mb,
                LocationUsage.storage_gb,
                LocationUsage.vclusters,
            ).where(
                or_(
                    LocationUsage.cpu_millis != 0,
                    LocationUsage.memory_mb != 0,
                    LocationUsage.storage_gb != 0,
                    LocationUsage.vclusters != 0,
                )
            )
        )
        return self._placer.usage(
            (location_id, _as_demand((int(cpu), int(memory), int(storage), int(vcs))))
            for location_id, cpu, memory, storage, vcs in rows
        )

    async def _current(self, conn: AsyncConnection) -> Usage:
        """The totals, under the ledger's lock: the ones kept in memory while the clock says they are current."""
        tick = await conn.scalar(select(LedgerClock.tick).where(LedgerClock.id == 1))
        if tick is None:
            raise RuntimeError("the scheduler's ledger clock row is missing")
        if self._cache is None or self._cache_tick != tick:
            self._cache, self._cache_tick = await self._used(conn), tick
        return self._cache

    def _advance(self, tick: int, changes: list[_Change]) -> None:
        """After a commit: its changes applied to the kept totals when nothing else moved the clock since.

        The clock's row is locked by each writer until it commits, so ticks follow commit order: the
        tick right after the kept one is this transaction; any other means a transaction this ledger
        did not see, and the totals are read again at the next placement.
        """
        if self._cache is None or tick != self._cache_tick + 1:
            self._cache = None
            return
        for location_id, amounts, sign in changes:
            self._cache.add(location_id, _as_demand(amounts), sign)
        self._cache_tick = tick

    async def _count(self, conn: AsyncConnection, *counted: _Change) -> int:
        """Adds amounts to their locations' totals (sign -1: takes them away) in `conn`'s transaction
        and advances the ledger clock; returns the new tick.

        All the locations' totals change in one statement (the changes of each location netted), then
        the clock: every writer locks the totals' rows before the clock's, in the order of location ids.
        """
        net: dict[str, list[int]] = {}
        for location_id, amounts, sign in counted:
            total = net.setdefault(location_id, [0, 0, 0, 0])
            for index, amount in enumerate(amounts):
                total[index] += sign * amount
        rows = [
            dict(zip(("location_id", *_TOTALS), (location_id, *net[location_id]), strict=True))
            for location_id in sorted(net)
        ]
        table = LocationUsage.__table__
        statement = (sqlite.insert if self._sqlite else postgresql.insert)(LocationUsage).values(rows)
        # One atomic statement: concurrent releases (outside the ledger's lock) add up, never overwrite.
        await conn.execute(
            statement.on_conflict_do_update(
                index_elements=[table.c.location_id],
                set_={name: table.c[name] + statement.excluded[name] for name in _TOTALS},
            )
        )
        tick = await conn.scalar(
            update(LedgerClock).where(LedgerClock.id == 1).values(tick=LedgerClock.tick + 1).returning(LedgerClock.tick)
        )
        if tick is None:
            # Without its row (migration 0002 writes it), kept totals could not be told stale.
            raise RuntimeError("the scheduler's ledger clock row is missing")
        return int(tick)

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


# Amounts as the location totals' columns hold them: cpu in millicores, memory, storage, vClusters.
_Amounts = tuple[int, int, int, int]
_TOTALS = ("cpu_millis", "memory_mb", "storage_gb", "vclusters")

# A change to a location's totals: the location, the amounts, and 1 to add them or -1 to take them away.
_Change = tuple[str, _Amounts, int]

# The most placements one group transaction writes.
_GROUP_MOST = 256


@dataclass(frozen=True)
class _Asking:
    """A placement (in a region, or only on `pinned`) or, with `location_id`, a set reservation,
    waiting for its group."""

    deployment_id: str
    demand: Demand
    geographic_region: str = ""
    pinned: str | None = None
    location_id: str | None = None


def cpu_millis(cpu: float) -> int:
    """A reservation's cpu as the totals count it: whole millicores, rounded up, so never less than it holds."""
    return math.ceil(round(cpu * 1000, 6))


async def _held(conn: AsyncConnection, deployment_id: str, lock: bool = False) -> tuple[str, Demand] | None:
    """The deployment's reservation; `lock` keeps a concurrent release from deleting it until commit."""
    return (await _held_all(conn, [deployment_id], lock)).get(deployment_id)


async def _held_all(
    conn: AsyncConnection, deployment_ids: Sequence[str], lock: bool = False
) -> dict[str, tuple[str, Demand]]:
    """The reservations of those deployments that hold one, in one statement (`lock`: see _held)."""
    query = select(
        Reservation.deployment_id,
        Reservation.location_id,
        Reservation.cpu,
        Reservation.memory_mb,
        Reservation.storage_gb,
        Reservation.vclusters,
    ).where(Reservation.deployment_id.in_(deployment_ids))
    rows = await conn.execute(query.with_for_update() if lock else query)
    return {
        deployment_id: (
            location_id,
            Demand(cpu=float(cpu), memory_mb=int(memory), storage_gb=int(storage), vclusters=int(vcs)),
        )
        for deployment_id, location_id, cpu, memory, storage, vcs in rows
    }


def _counted(demand: Demand) -> Demand:
    """A reservation's demand as the totals count it (cpu in whole millicores, rounded up)."""
    return _as_demand(_amounts(demand))


def _amounts(demand: Demand) -> _Amounts:
    """A reservation's demand as the location totals' columns add it up: exact integers."""
    return cpu_millis(demand.cpu), demand.memory_mb, demand.storage_gb, demand.vclusters


def _as_demand(amounts: _Amounts) -> Demand:
    """Amounts of the location totals' columns as a Demand (cpu back in cores)."""
    cpu, memory, storage, vcs = amounts
    return Demand(cpu=cpu / 1000, memory_mb=memory, storage_gb=storage, vclusters=vcs)


def _without(used: Mapping[str, Demand], location_id: str, holds: Demand) -> Mapping[str, Demand]:
    """Usage with what one deployment holds on a location counted as free."""
    taken = used.get(location_id)
    if taken is None:
        return used
    return {
        **used,
        location_id: Demand(
            cpu=max(taken.cpu - holds.cpu, 0.0),
            memory_mb=max(taken.memory_mb - holds.memory_mb, 0),
            storage_gb=max(taken.storage_gb - holds.storage_gb, 0),
            vclusters=max(taken.vclusters - holds.vclusters, 0),
        ),
    }


def _columns(demand: Demand) -> dict[str, float | int]:
    return {
        "cpu": demand.cpu,
        "memory_mb": demand.memory_mb,
        "storage_gb": demand.storage_gb,
        "vclusters": demand.vclusters,
    }
