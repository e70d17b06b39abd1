"""The gauges' refresh: its count of live deployments reads one index, and a slow refresh waits longer."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from apphosting import db, metrics
from services.deployments import app
from services.deployments.metrics import LIVE_COUNTS

INDEX = "ix_deployments_deleted_status_region"


async def test_live_deployments_are_counted_from_one_index_alone(database_url: str) -> None:
    engine = db.make_engine(database_url)
    try:
        await db.upgrade(engine, app.MIGRATIONS, app.VERSION_TABLE)
        statement = str(LIVE_COUNTS.compile(engine, compile_kwargs={"literal_binds": True}))
        async with engine.connect() as connection:
            if engine.dialect.name == "sqlite":
                plan = " | ".join(
                    str(row[-1]) for row in await connection.execute(text(f"EXPLAIN QUERY PLAN {statement}"))
                )
                # The index's own order groups the rows: no table row is read and nothing is sorted.
                assert f"USING COVERING INDEX {INDEX}" in plan, plan
                assert "TEMP B-TREE" not in plan, plan
            else:
                # An empty table is read whole at once; what is asked is that the index can answer alone.
                await connection.execute(text("SET enable_seqscan = off"))
                plan = " | ".join(str(row[0]) for row in await connection.execute(text(f"EXPLAIN {statement}")))
                assert f"Index Only Scan using {INDEX}" in plan, plan
    finally:
        await engine.dispose()


@pytest.mark.parametrize("took", [0.0, 0.01, 0.1, 0.5, 2.0, 30.0])
def test_refreshes_take_at_most_their_share_of_the_time(took: float) -> None:
    refresher = metrics.Refresher()
    pause = refresher.pause(took)
    assert pause >= refresher.interval
    assert took / (took + pause) <= metrics.REFRESH_SHARE + 1e-9
    if took * (1 / metrics.REFRESH_SHARE - 1) <= refresher.interval:
        # A quick refresh keeps the interval.
        assert pause == refresher.interval
