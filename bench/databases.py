"""The databases a scenario can run on: a SQLite file in its folder, or a fresh PostgreSQL database dropped after."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

DATABASES = ("sqlite", "postgresql")
POSTGRES_ADMIN_URL = os.environ.get("APPHOSTING_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


async def postgres_unreachable(admin_url: str = POSTGRES_ADMIN_URL) -> str | None:
    """None when PostgreSQL answers at admin_url, else why not."""
    try:
        connection = await asyncpg.connect(admin_url, timeout=3)
    except Exception as exc:
        return f"PostgreSQL is not reachable at {admin_url} ({type(exc).__name__}: {exc})"
    await connection.close()
    return None


@asynccontextmanager
async def database(kind: str, admin_url: str = POSTGRES_ADMIN_URL) -> AsyncIterator[str | None]:
    """Yields the SQLAlchemy URL of an empty database of that kind for one scenario; None: the Stack's SQLite file."""
    if kind == "sqlite":
        yield None
        return
    if kind != "postgresql":
        raise ValueError(f"unknown database {kind!r}; known: {', '.join(DATABASES)}")
    name = f"apphosting_bench_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield f"{admin_url.rsplit('/', 1)[0]}/{name}".replace("postgresql://", "postgresql+asyncpg://", 1)
    finally:
        admin = await asyncpg.connect(admin_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
