"""Housekeeping's looks for histories over HISTORY_BYTES or EVENT_HISTORY read partial indexes of those records,
not the tables."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncConnection

from services.deployments.store import heavy_histories, long_histories
from services.deployments.tables import EVENT_HISTORY, HISTORY_BYTES, DeploymentRow
from tests.support.counting_store import Counting
from tests.support.records import new_deployment

OWNER = str(uuid.uuid4())


async def test_heavy_histories_are_read_from_their_partial_index(store: Counting) -> None:
    """At a million records the look read the whole table (0.4 s on SQLite) in every housekeeping round."""
    ids = {}
    for name, stored in (("light", 1000), ("at-bound", HISTORY_BYTES), ("heavy", HISTORY_BYTES + 1)):
        row, _ = await store.create(new_deployment(name, OWNER), lambda row, deployment: [])
        ids[name] = row.id
        async with store.transaction() as session:
            await session.execute(update(DeploymentRow).where(DeploymentRow.id == row.id).values(history_bytes=stored))

    async with store.engine.begin() as connection:
        found = (await connection.execute(heavy_histories(HISTORY_BYTES))).scalars().all()
        assert found == [ids["heavy"]]
        # Another bound is read from the table, with the same answer.
        smaller = (await connection.execute(heavy_histories(2000))).scalars().all()
        assert sorted(smaller) == sorted([ids["at-bound"], ids["heavy"]])

        assert "ix_deployments_heavy_history" in await _plan(connection, heavy_histories(HISTORY_BYTES))


async def _plan(connection: AsyncConnection, query: Any) -> str:
    sql = str(query.compile(dialect=connection.dialect))
    if connection.dialect.name == "sqlite":
        return " ".join(str(step) for step in (await connection.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)).all())
    # A table this small is read whole when the planner may: ask whether the index can serve it.
    await connection.exec_driver_sql("SET LOCAL enable_seqscan = off")
    return " ".join(str(step) for step in (await connection.exec_driver_sql("EXPLAIN " + sql)).all())


async def test_long_histories_are_counted_from_revisions_and_read_from_their_partial_index(store: Counting) -> None:
    """The look counted every deployment's events (GROUP BY over the whole events table) in every round.
    Every revision is one event, so a record keeps revision - events_from + 1 of them."""
    ids = {}
    # (name, revision, events_from): EVENT_HISTORY kept; one more; EVENT_HISTORY kept after a trim.
    for name, revision, events_from in (
        ("at-bound", EVENT_HISTORY, 1),
        ("long", EVENT_HISTORY + 1, 1),
        ("trimmed", 5 * EVENT_HISTORY, 4 * EVENT_HISTORY + 1),
    ):
        row, _ = await store.create(new_deployment(name, OWNER), lambda row, deployment: [])
        ids[name] = row.id
        async with store.transaction() as session:
            await session.execute(
                update(DeploymentRow)
                .where(DeploymentRow.id == row.id)
                .values(revision=revision, events_from=events_from)
            )

    async with store.engine.begin() as connection:
        found = (await connection.execute(long_histories(EVENT_HISTORY))).scalars().all()
        assert found == [ids["long"]]
        smaller = (await connection.execute(long_histories(EVENT_HISTORY - 1))).scalars().all()
        assert sorted(smaller) == sorted(ids.values())
        assert "ix_deployments_long_history" in await _plan(connection, long_histories(EVENT_HISTORY))
