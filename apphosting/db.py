"""Database engines and Alembic migrations, shared by every process that owns tables."""

from __future__ import annotations

import time
import zlib
from datetime import UTC, datetime
from typing import Any

from alembic import command, context
from alembic.config import Config
from sqlalchemy import Connection, DateTime, Dialect, MetaData, TypeDecorator, event, exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry, NullPool, PoolProxiedConnection

from apphosting import sqlite_driver


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every engine (SQLite keeps no zone, so it is put back on read)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def normalise_url(url: str) -> str:
    """Picks the async driver for a plain URL: postgresql:// → asyncpg, sqlite:// → aiosqlite."""
    parsed = make_url(url)
    drivers = {
        "postgresql": "postgresql+asyncpg",
        "postgres": "postgresql+asyncpg",
        "sqlite": "sqlite+aiosqlite",
    }
    if parsed.drivername in drivers:
        parsed = parsed.set(drivername=drivers[parsed.drivername])
    return parsed.render_as_string(hide_password=False)


def _sqlite_pragmas(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers go on while one writer commits; busy_timeout makes writers queue, not fail.
    # The timeout goes first: switching a new database to WAL takes a lock another starter may hold.
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


# A pooled server connection idle for longer than this is pinged before it is handed out again.
PING_IDLE_AFTER = 1.0


def _ping_when_idle(engine: AsyncEngine, idle_after: float) -> None:
    """Pings a pooled connection on checkout only when it sat idle for longer than `idle_after` seconds.

    A connection that went away while idle (a database restart, a cut) is replaced before a caller
    sees it, as with pre-ping, but a busy process does not pay a round trip on every checkout. One
    that dies while in use fails that statement, and the pool then renews every connection.
    """
    dialect = engine.sync_engine.dialect

    def checkin(_dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        record.info["idle_since"] = time.monotonic()

    def checkout(dbapi_connection: Any, record: ConnectionPoolEntry, _proxy: PoolProxiedConnection) -> None:
        idle_since = record.info.pop("idle_since", None)
        if idle_since is None or time.monotonic() - idle_since <= idle_after:
            return
        try:
            dialect.do_ping(dbapi_connection)
        except Exception as failure:
            # The pool drops this connection and checks out another one.
            raise exc.DisconnectionError(f"pooled connection gone while idle: {failure}") from failure

    event.listen(engine.sync_engine, "checkin", checkin)
    event.listen(engine.sync_engine, "checkout", checkout)


def make_engine(url: str, *, ping_idle_after: float = PING_IDLE_AFTER, **kwargs: Any) -> AsyncEngine:
    """An async engine for the URL, with SQLite set up for WAL and waiting writers."""
    url = normalise_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.get_driver_name() == "aiosqlite":
            kwargs.setdefault("module", sqlite_driver.dbapi())
        engine = create_async_engine(url, **kwargs)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    engine = create_async_engine(url, **kwargs)
    _ping_when_idle(engine, ping_idle_after)
    return engine


def _upgrade(connection: Connection, script_location: str, version_table: str) -> None:
    config = Config()
    config.set_main_option("script_location", script_location)
    config.attributes["connection"] = connection
    config.attributes["version_table"] = version_table
    command.upgrade(config, "head")


# One advisory lock for every owner's migrations on PostgreSQL: starters migrate one at a time.
_MIGRATION_LOCK = zlib.crc32(b"apphosting.db.upgrade")
# How long a starter on SQLite waits for another one's migration before it gives up.
_SQLITE_MIGRATION_WAIT_MS = 120_000


def _sqlite_exclusive(engine: AsyncEngine) -> AsyncEngine:
    """A one-connection engine on the same SQLite file whose transactions begin EXCLUSIVE and hold the DDL.

    By default pysqlite commits before every DDL statement, so two starters could both see no version
    table and both create it; here the whole upgrade is one transaction that a second starter waits for.
    """
    exclusive = create_async_engine(engine.url, poolclass=NullPool)

    def connect(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        dbapi_connection.isolation_level = None
        _sqlite_pragmas(dbapi_connection, record)
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={_SQLITE_MIGRATION_WAIT_MS}")
        cursor.close()

    def begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN EXCLUSIVE")

    event.listen(exclusive.sync_engine, "connect", connect)
    event.listen(exclusive.sync_engine, "begin", begin)
    return exclusive


async def upgrade(engine: AsyncEngine, script_location: str, version_table: str) -> None:
    """Brings the schema of one owning service to its newest migration.

    Safe when several processes start at once on the same database: each migrates under a lock and
    reads the version after it has the lock, so a later starter finds the work done.
    """
    backend = engine.dialect.name
    if backend == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        exclusive = _sqlite_exclusive(engine)
        try:
            async with exclusive.begin() as connection:
                await connection.run_sync(_upgrade, script_location, version_table)
        finally:
            await exclusive.dispose()
        return
    async with engine.begin() as connection:
        if backend == "postgresql":
            # Released when this transaction ends, after the migration has committed.
            await connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
        await connection.run_sync(_upgrade, script_location, version_table)


def run_migrations(metadata: MetaData) -> None:
    """The body of every service's Alembic env.py: migrate on the connection upgrade() hands in."""
    config = context.config
    connection = config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("run migrations through `apphosting migrate` or apphosting.db.upgrade()")
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=config.attributes["version_table"],
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
