"""SQLite engines run each statement in one trip to aiosqlite's thread, and read as the stock driver does."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, event, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from apphosting import db

_METADATA = MetaData()
_ITEMS = Table(
    "items",
    _METADATA,
    Column("id", Integer, primary_key=True),
    Column("name", String(20), unique=True, nullable=False),
)


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    made = db.make_engine(f"sqlite:///{tmp_path / 'driver.db'}")
    async with made.begin() as connection:
        await connection.run_sync(_METADATA.create_all)
    yield made
    await made.dispose()


@pytest.fixture
def trips(engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every call queued to the thread of a connection this test's engine handed out, by the function
    it runs. Connections other tests left open on the same event loop are not counted."""
    own: set[int] = set()
    made: list[Any] = []
    queue: Any = aiosqlite.Connection._execute

    def checked_out(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        own.add(id(dbapi_connection.driver_connection))

    async def counted(self: aiosqlite.Connection, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if id(self) in own:
            made.append(fn)
        return await queue(self, fn, *args, **kwargs)

    event.listen(engine.sync_engine, "checkout", checked_out)
    monkeypatch.setattr(aiosqlite.Connection, "_execute", counted)
    return made


async def test_each_statement_is_one_trip_to_the_thread(engine: AsyncEngine, trips: list[Any]) -> None:
    async with engine.connect() as connection:
        await connection.execute(text("SELECT 1"))
        trips.clear()
        await connection.execute(insert(_ITEMS).values(name="a"))
        await connection.execute(select(_ITEMS))
        await connection.execute(insert(_ITEMS), [{"name": "b"}, {"name": "c"}])
        await connection.execute(update(_ITEMS).values(name=_ITEMS.c.name + "!"))
    # Four statements, then the rollback at the end of the block.
    assert len(trips) == 5


async def test_a_rollback_with_no_transaction_open_is_not_sent(engine: AsyncEngine, trips: list[Any]) -> None:
    async with engine.connect() as connection:
        await connection.execute(select(_ITEMS))
        await connection.execute(select(_ITEMS))
    # Reads open no transaction: the block's rollback and the pool's reset went nowhere.
    assert len(trips) == 2
    trips.clear()
    async with engine.begin() as connection:
        await connection.execute(insert(_ITEMS).values(name="a"))
    # The INSERT and the commit; the pool's reset after the commit went nowhere.
    assert len(trips) == 2
    trips.clear()
    async with engine.connect() as connection:
        await connection.execute(insert(_ITEMS).values(name="b"))
        await connection.rollback()
        # A write opened one: its rollback is sent, and undoes it.
        assert len(trips) == 2
        assert await connection.scalar(select(func.count()).select_from(_ITEMS)) == 1


async def test_rows_counts_and_ids_read_as_with_the_stock_driver(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        inserted = await connection.execute(insert(_ITEMS).values(name="a"))
        assert inserted.inserted_primary_key == (1,)
        returned = await connection.execute(insert(_ITEMS).values(name="b").returning(_ITEMS.c.id))
        assert returned.scalar_one() == 2
        await connection.execute(insert(_ITEMS), [{"name": "c"}, {"name": "d"}])
        changed = await connection.execute(update(_ITEMS).where(_ITEMS.c.id > 2).values(name=_ITEMS.c.name + "!"))
        assert changed.rowcount == 2
        rows = (await connection.execute(select(_ITEMS.c.id, _ITEMS.c.name).order_by(_ITEMS.c.id))).all()
        assert [tuple(row) for row in rows] == [(1, "a"), (2, "b"), (3, "c!"), (4, "d!")]
        assert list((await connection.execute(select(_ITEMS).where(_ITEMS.c.id > 9))).all()) == []
        some = await connection.execute(select(_ITEMS.c.id).order_by(_ITEMS.c.id))
        assert [tuple(row) for row in some.fetchmany()] == [(1,)]
        assert [tuple(row) for row in some.fetchmany(2)] == [(2,), (3,)]
        streamed = await connection.stream(select(_ITEMS.c.id).order_by(_ITEMS.c.id))
        assert [row.id async for row in streamed] == [1, 2, 3, 4]
    # Committed: another connection reads it.
    async with engine.connect() as connection:
        assert await connection.scalar(select(_ITEMS.c.name).where(_ITEMS.c.id == 4)) == "d!"


async def test_errors_are_sqlalchemys_and_leave_the_connection_usable(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        await connection.execute(insert(_ITEMS).values(name="a"))
        with pytest.raises(IntegrityError):
            await connection.execute(insert(_ITEMS).values(name="a"))
        await connection.rollback()
        with pytest.raises(OperationalError, match="no such table"):
            await connection.execute(text("SELECT * FROM missing"))
        await connection.rollback()
        assert await connection.scalar(select(_ITEMS.c.name)) is None
        await connection.execute(insert(_ITEMS).values(name="b"))
        assert await connection.scalar(select(_ITEMS.c.name)) == "b"
