"""The deployments database, migrated, for the tests that drive the store directly."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from apphosting import db
from services.deployments.app import MIGRATIONS, VERSION_TABLE
from tests.support.counting_store import Counting


@pytest.fixture
async def migrated_engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = db.make_engine(database_url)
    try:
        await db.upgrade(engine, MIGRATIONS, VERSION_TABLE)
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
def store(migrated_engine: AsyncEngine) -> Counting:
    """A store on that database that also counts its commits that wrote outbox rows."""
    return Counting(migrated_engine)
