"""Housekeeping's look for histories over HISTORY_BYTES reads a partial index of those records, not the table."""

from __future__ import annotations

import uuid

from sqlalchemy import update

from services.deployments.store import heavy_histories
from services.deployments.tables import HISTORY_BYTES, DeploymentRow
from tests.support.counting_store import Counting
from tests.support.records import new_deployment

OWNER = str(uuid.uuid4())


async def test_heavy_histories_are_read_from_their_partial_index(store: Counting) -> None:
    """At a million records the look read the whole table (0.4 s on SQLite) in every housekeeping round."""
    ids = {}
    for name, stored in (("light", 1000), ("at-bound", HISTORY_BYTES), ("heavy", HISTORY_BYTES + 1)):
        row, _ = await store.create(new_deployment(name, OWNER), lambda row: [])
        ids[name] = row.id
        async with store.transaction() as session:
            await session.execute(update(DeploymentRow).where(DeploymentRow.id == row.id).values(history_bytes=stored))

    async with store.engine.begin() as connection:
        found = (await connection.execute(heavy_histories(HISTORY_BYTES))).scalars().all()
        assert found == [ids["heavy"]]
        # Another bound is read from the table, with the same answer.
        smaller = (await connection.execute(heavy_histories(2000))).scalars().all()
        assert sorted(smaller) == sorted([ids["at-bound"], ids["heavy"]])

        sql = str(heavy_histories(HISTORY_BYTES).compile(dialect=connection.dialect))
        if connection.dialect.name == "sqlite":
            plan = " ".join(str(step) for step in (await connection.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)).all())
        else:
            # A table this small is read whole when the planner may: ask whether the index can serve it.
            await connection.exec_driver_sql("SET LOCAL enable_seqscan = off")
            plan = " ".join(str(step) for step in (await connection.exec_driver_sql("EXPLAIN " + sql)).all())
        assert "ix_deployments_heavy_history" in plan, plan
