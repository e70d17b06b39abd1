"""The Alembic migrations build exactly the schema the models describe, on each engine."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection

from apphosting import db
from services.deployments.app import MIGRATIONS, VERSION_TABLE
from services.deployments.tables import Base


async def test_migrations_match_the_models(database_url: str) -> None:
    engine = db.make_engine(database_url)
    try:
        await db.upgrade(engine, MIGRATIONS, VERSION_TABLE)
        # A second upgrade finds nothing to do.
        await db.upgrade(engine, MIGRATIONS, VERSION_TABLE)

        def diff(connection: Connection) -> list[Any]:
            context = MigrationContext.configure(
                connection, opts={"version_table": VERSION_TABLE, "compare_type": True}
            )
            return list(compare_metadata(context, Base.metadata))

        async with engine.connect() as connection:
            assert await connection.run_sync(diff) == []
    finally:
        await engine.dispose()
