"""The PostgreSQL pool: a connection lost while idle is replaced before use, without a ping per checkout."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from apphosting import db


def _postgresql_only(database_url: str) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite opens a file: there is no server connection to lose")


async def _backend_pid(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        return int((await connection.execute(text("SELECT pg_backend_pid()"))).scalar_one())


async def _one_connection(database_url: str, ping_idle_after: float) -> AsyncEngine:
    """An engine whose pool holds one PostgreSQL connection."""
    _postgresql_only(database_url)
    return db.make_engine(database_url, ping_idle_after=ping_idle_after, pool_size=1, max_overflow=0)


async def _lose_the_connection(database_url: str, engine: AsyncEngine) -> int:
    """Ends the server side of the engine's pooled connection while it is idle; its backend pid."""
    pid = await _backend_pid(engine)
    other = db.make_engine(database_url)
    try:
        async with other.connect() as connection:
            await connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    finally:
        await other.dispose()
    return pid


async def test_a_connection_lost_while_idle_is_replaced_before_use(database_url: str) -> None:
    engine = await _one_connection(database_url, ping_idle_after=0.0)
    try:
        lost = await _lose_the_connection(database_url, engine)
        # Idle for longer than the (zero) threshold: pinged, found gone, replaced; the caller sees no error.
        assert await _backend_pid(engine) != lost
    finally:
        await engine.dispose()


async def test_a_busy_pool_does_not_ping_and_renews_itself_after_a_loss(database_url: str) -> None:
    engine = await _one_connection(database_url, ping_idle_after=3600.0)
    try:
        lost = await _lose_the_connection(database_url, engine)
        # Not idle long enough to be pinged: the statement meets the lost connection and fails as a
        # disconnect (the API answers UNAVAILABLE), and the pool renews its connections.
        with pytest.raises(DBAPIError) as failed:
            await _backend_pid(engine)
        assert failed.value.connection_invalidated
        assert await _backend_pid(engine) != lost
    finally:
        await engine.dispose()
