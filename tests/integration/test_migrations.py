"""The Alembic migrations build exactly the schema the models describe, on each engine."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, MetaData

from apphosting import db
from scheduler import ledger, tables
from services.deployments import app
from services.deployments.tables import Base

OWNERS = [
    (app.MIGRATIONS, app.VERSION_TABLE, Base.metadata),
    (ledger.MIGRATIONS, ledger.VERSION_TABLE, tables.Base.metadata),
]


async def test_migrations_match_the_models(database_url: str) -> None:
    engine = db.make_engine(database_url)
    try:
        # Both owners share one database, each with its own version table; a second upgrade is a no-op.
        for _ in range(2):
            for script_location, version_table, _metadata in OWNERS:
                await db.upgrade(engine, script_location, version_table)

        def diff(connection: Connection) -> list[Any]:
            differences: list[Any] = []
            for _location, version_table, metadata in OWNERS:
                context = MigrationContext.configure(
                    connection,
                    opts={
                        "version_table": version_table,
                        "compare_type": True,
                        "include_name": _owned_by(metadata),
                    },
                )
                differences.extend(compare_metadata(context, metadata))
            return differences

        async with engine.connect() as connection:
            assert await connection.run_sync(diff) == []
    finally:
        await engine.dispose()


def _owned_by(metadata: MetaData) -> Any:
    """Compares only the tables one owner declares, not its neighbours' in the same database."""

    def include(name: str | None, kind: str, parent: Any) -> bool:
        return kind != "table" or name in metadata.tables

    return include


# One process: a starting API or scheduler, upgrading its own version table, as each does at start.
_STARTER = """
import asyncio, sys
from apphosting import db
from scheduler import ledger
from services.deployments import app

async def main(url: str, order: str) -> None:
    owners = [(app.MIGRATIONS, app.VERSION_TABLE), (ledger.MIGRATIONS, ledger.VERSION_TABLE)]
    engine = db.make_engine(url)
    try:
        for script_location, version_table in owners if order == "api-first" else owners[::-1]:
            await db.upgrade(engine, script_location, version_table)
    finally:
        await engine.dispose()

# Imports done: say so, and start together with the others when the test says go.
print("ready", flush=True)
sys.stdin.readline()
asyncio.run(main(sys.argv[1], sys.argv[2]))
"""
_STARTERS = 6


async def test_concurrent_starters_on_a_fresh_database_all_upgrade_it(database_url: str) -> None:
    async def spawn(order: str) -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _STARTER,
            database_url,
            order,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        assert process.stdout is not None
        assert await asyncio.wait_for(process.stdout.readline(), timeout=120) == b"ready\n"
        return process

    async def finish(process: asyncio.subprocess.Process) -> tuple[int, bytes]:
        output, _ = await asyncio.wait_for(process.communicate(b"go\n"), timeout=180)
        return process.returncode or 0, output

    processes = await asyncio.gather(*(spawn("api-first" if i % 2 else "ledger-first") for i in range(_STARTERS)))
    # Every process has imported everything: they start upgrading within a moment of each other.
    results = await asyncio.gather(*(finish(p) for p in processes))

    assert [(code, output.decode()[-2000:]) for code, output in results if code] == []
    engine = db.make_engine(database_url)
    try:

        def state(connection: Connection) -> list[Any]:
            found: list[Any] = []
            for _location, version_table, metadata in OWNERS:
                versions = connection.exec_driver_sql(f"SELECT version_num FROM {version_table}").all()
                found.append(len(versions))
                context = MigrationContext.configure(
                    connection,
                    opts={"version_table": version_table, "compare_type": True, "include_name": _owned_by(metadata)},
                )
                found.extend(compare_metadata(context, metadata))
            return found

        async with engine.connect() as connection:
            assert await connection.run_sync(state) == [1, 1]
    finally:
        await engine.dispose()
