"""What reaches the database driver: each trip to aiosqlite's thread, or each asyncpg statement and BEGIN."""

from __future__ import annotations

from typing import Any

import aiosqlite
import asyncpg
import pytest


def driver_calls(monkeypatch: pytest.MonkeyPatch, dialect: str) -> list[str]:
    """Records from now on, on SQLite, the name of each function run in aiosqlite's thread (one trip each);
    on PostgreSQL, the first word of each statement asyncpg runs (BEGIN and COMMIT included)."""
    calls: list[str] = []
    if dialect == "sqlite":
        trip = aiosqlite.Connection._execute

        async def counted_trip(self: aiosqlite.Connection, fn: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append(fn.__name__)
            return await trip(self, fn, *args, **kwargs)  # type: ignore[no-untyped-call]

        monkeypatch.setattr(aiosqlite.Connection, "_execute", counted_trip)
        return calls
    connection = asyncpg.connection.Connection
    for name in ("execute", "executemany", "fetch"):
        original = getattr(connection, name)

        def counted(original: Any) -> Any:
            async def call(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
                # A transaction's own statements are asyncpg's too ("BEGIN;", "COMMIT;").
                calls.append(query.split(None, 1)[0].rstrip(";").upper())
                return await original(self, query, *args, **kwargs)

            return call

        monkeypatch.setattr(connection, name, counted(original))
    return calls
