"""Rows inserted in groups (a create's, an event batch's) read back as they were given, with the
defaults of the columns none of them set, in one executemany per table."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import event, select

from services.deployments.store import DeploymentStore, _insert_all, new_record
from services.deployments.tables import DeploymentRow, EventRow, OutboxRow, ReleaseRow
from tests.support.records import new_deployment


async def test_inserted_rows_read_back_as_given_with_their_columns_defaults(store: DeploymentStore) -> None:
    moment = datetime(2026, 11, 30, 6, 0, 1, 123456, tzinfo=UTC)
    record = new_record(new_deployment("inserted", str(uuid.uuid4())), moment)
    events = [
        # Both set `final` and leave `simulated` to its default.
        EventRow(
            event_id="e1",
            deployment_id=record.id,
            revision=1,
            status="pending",
            phase="accepted",
            message="m",
            source="api",
            final=True,
            time=moment,
            changes={"phase": "accepted", "nested": {"k": [1, "ü"]}},
        ),
        EventRow(
            event_id="e2",
            deployment_id=record.id,
            revision=2,
            status="running",
            phase="ready",
            message="m",
            source="worker",
            final=False,
            time=moment,
            changes={},
        ),
    ]
    # The current release keeps no spec of its own (None); an older one does.
    releases = [
        ReleaseRow(
            deployment_id=record.id,
            number=1,
            spec={"docker_image": "nginx:1"},
            operation="create",
            created_at=moment,
            healthy=False,
        ),
        ReleaseRow(
            deployment_id=record.id,
            number=2,
            spec=None,
            operation="update",
            created_at=moment,
            healthy=True,
        ),
    ]
    outbox = [
        OutboxRow(id="o1", subject="s.1", payload=b"\x00\xffbytes", headers={"traceparent": "00-x"}, created_at=moment),
        OutboxRow(id="o2", subject="s.2", payload=b"", headers=None, created_at=moment),
    ]
    statements: list[tuple[str, bool]] = []

    def seen(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        statements.append((statement.split(None, 3)[2].strip('"'), executemany))

    engine = store.engine.sync_engine
    event.listen(engine, "before_cursor_execute", seen)
    try:
        async with store.transaction() as session:
            connection = await session.connection()
            for rows in ([record], events, releases, outbox):
                await _insert_all(connection, rows)
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    tables = ["deployments", "deployment_events", "deployment_releases", "outbox"]
    assert [table for table, _ in statements] == tables
    assert all(many for _, many in statements[1:])

    async with store.session() as session:
        stored = await session.scalar(select(DeploymentRow).where(DeploymentRow.id == record.id))
        assert stored is not None
        for key in ("user_id", "name", "spec", "status", "phase", "revision", "release", "cpu_millis", "is_adopted"):
            assert getattr(stored, key) == getattr(record, key), key
        assert stored.created_at == moment
        assert stored.deleted_at is None
        # Python-side defaults no record set.
        assert stored.image_updates_paused is False
        assert stored.record_bytes == 0

        found = (await session.scalars(select(EventRow).order_by(EventRow.revision))).all()
        assert [(e.event_id, e.final, e.simulated, e.changes, e.time) for e in found] == [
            ("e1", True, False, {"phase": "accepted", "nested": {"k": [1, "ü"]}}, moment),
            ("e2", False, False, {}, moment),
        ]
        kept = (await session.scalars(select(ReleaseRow).order_by(ReleaseRow.number))).all()
        assert [(r.number, r.spec, r.reason, r.healthy) for r in kept] == [
            (1, {"docker_image": "nginx:1"}, "", False),
            (2, None, "", True),
        ]
        sent = (await session.scalars(select(OutboxRow).order_by(OutboxRow.seq))).all()
        assert [(o.id, o.payload, o.headers) for o in sent] == [
            ("o1", b"\x00\xffbytes", {"traceparent": "00-x"}),
            ("o2", b"", None),
        ]
