"""The Alembic migrations build exactly the schema the models describe, on each engine."""

from __future__ import annotations

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
