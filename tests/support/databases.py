"""Test databases: a SQLite file per test, and a fresh PostgreSQL database per test where a server answers."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import uuid
from functools import cache

import asyncpg

POSTGRES_ADMIN_URL = os.environ.get("APPHOSTING_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


@cache
def postgres_unreachable_reason() -> str | None:
    """None when PostgreSQL answers at POSTGRES_ADMIN_URL, else why the PostgreSQL runs are skipped."""

    async def probe() -> None:
        connection = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=3)
        await connection.close()

    try:
        # Its own thread, since the tests call this from inside their event loop.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, probe()).result()
    except Exception as exc:
        return (
            f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL} ({type(exc).__name__}: {exc}); "
            "set APPHOSTING_TEST_POSTGRES to a server's admin URL to run these"
        )
    return None


async def create_postgres_database() -> tuple[str, str]:
    """Creates an empty database; returns its SQLAlchemy URL and its name."""
    name = f"apphosting_test_{uuid.uuid4().hex[:12]}"
    connection = await asyncpg.connect(POSTGRES_ADMIN_URL)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
    return f"{base}/{name}".replace("postgresql://", "postgresql+asyncpg://", 1), name


async def drop_postgres_database(name: str) -> None:
    connection = await asyncpg.connect(POSTGRES_ADMIN_URL)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()
