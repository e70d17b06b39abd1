"""Creates written together (group commit): each caller answered as if its create were written alone."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from typing import Any

import grpc
import pytest
from sqlalchemy import func, select

from apphosting import db
from apphosting.v1 import deployments_pb2 as pb
from services.deployments.errors import ServiceError
from services.deployments.quotas import Quotas, Usage
from services.deployments.store import (
    DeploymentStore,
    NameTaken,
    NewDeployment,
    Outgoing,
    RequestIdReused,
    now,
)
from services.deployments.tables import DeploymentRow, EventRow, OutboxRow, ReleaseRow
from tests.support.counting_store import Counting
from tests.support.driver_calls import driver_calls
from tests.support.records import new_deployment

ALICE = str(uuid.uuid4())
BOB = str(uuid.uuid4())


def new(name: str, user_id: str = ALICE, request_id: str | None = None, request_hash: str = "h") -> NewDeployment:
    return new_deployment(name, user_id, request_id, request_hash)


def outbox(row: DeploymentRow, deployment: pb.Deployment) -> list[Outgoing]:
    return [Outgoing("test.placement", row.id.encode())]


async def create_all(store: DeploymentStore, news: list[NewDeployment], **options: Any) -> list[Any]:
    """Creates all at once (one group: each is queued before the writer first runs); each result or error."""
    return await asyncio.gather(*(store.create(item, outbox, **options) for item in news), return_exceptions=True)


async def count(store: DeploymentStore, table: Any, *where: Any) -> int:
    async with store.session() as session:
        return int(await session.scalar(select(func.count()).select_from(table).where(*where)) or 0)


async def test_many_concurrent_creates_are_stored_with_their_events_releases_and_outbox_rows(
    store: Counting,
) -> None:
    news = [new(f"app-{index}") for index in range(60)]
    results = await create_all(store, news)
    assert store.commits == 1
    rows = [row for row, _ in results]
    assert [row.name for row in rows] == [item.name for item in news]
    for row, change in results:
        assert change is not None
        assert change.row is row
        assert change.deployment.id == row.id
        assert change.deployment.name == row.name
        assert change.event.revision == 1
        stored = await store.get(ALICE, row.id)
        assert stored is not None
        assert (stored.status, stored.revision, stored.live_name) == ("pending", 1, row.name)
        assert stored.record_bytes == row.record_bytes
        assert stored.history_bytes == row.history_bytes
        assert stored.healthy_release is None
        assert stored.placement is None
        release = await store.release(row.id, 1)
        assert release is not None
        assert release.spec == row.spec
        history = await store.history_after(row.id, 0)
        assert [(event.revision, deployment.name) for event, deployment in history] == [(1, row.name)]
    assert await count(store, EventRow) == 60
    assert await count(store, ReleaseRow) == 60
    # The relay sends in seq order: the group's rows are in the order the creates came.
    assert [row.payload.decode() for row in await store.unsent()] == [row.id for row in rows]
    # Listed newest first, as created one after another.
    page = await store.page(ALICE, limit=100)
    assert [row["id"] for row in page] == [row.id for row in reversed(rows)]
    used = await store.usage(ALICE)
    assert (used.deployments, used.cpu_millis) == (60, 60 * 250)
    assert used.stored_bytes == sum(row.record_bytes + row.history_bytes for row in rows)


async def test_creates_queued_behind_a_group_are_written_in_the_next(store: Counting) -> None:
    first = asyncio.gather(*(store.create(new(f"first-{index}"), outbox) for index in range(10)))
    # Let the first group's transaction begin, then queue more behind it.
    await asyncio.sleep(0)
    second = asyncio.gather(*(store.create(new(f"second-{index}"), outbox) for index in range(10)))
    results = [*await first, *await second]
    assert len({row.id for row, _ in results}) == 20
    assert await count(store, DeploymentRow) == 20
    assert await count(store, OutboxRow) == 20


async def test_one_of_the_creates_of_one_name_in_a_group_wins(store: Counting) -> None:
    (taken, _) = await store.create(new("taken"), outbox)
    news = [new("same"), new("other"), new("same"), new("taken"), new("same"), new("same", user_id=BOB)]
    results = await create_all(store, news)
    assert store.commits == 2
    winner, _ = results[0]
    assert results[1][0].name == "other"
    for lost in (results[2], results[4]):
        assert isinstance(lost, NameTaken)
        assert lost.existing_id == winner.id
    assert isinstance(results[3], NameTaken)
    assert results[3].existing_id == taken.id
    # Names are per user.
    assert results[5][0].user_id == BOB
    assert await count(store, DeploymentRow, DeploymentRow.live_name == "same") == 2
    assert await count(store, OutboxRow) == 4


async def test_a_request_id_repeated_in_a_group_is_answered_with_the_first_record(store: Counting) -> None:
    earlier, _ = await store.create(new("earlier", request_id="r-0"), outbox)
    news = [
        new("one", request_id="r-1"),
        new("one", request_id="r-1"),
        new("changed", request_id="r-1", request_hash="other"),
        new("earlier", request_id="r-0"),
        new("earlier-changed", request_id="r-0", request_hash="other"),
        # Another user's request_id of the same value is another request.
        new("one", user_id=BOB, request_id="r-1"),
    ]
    results = await create_all(store, news)
    row, change = results[0]
    assert change is not None
    replayed, none = results[1]
    assert (replayed.id, none) == (row.id, None)
    assert isinstance(results[2], RequestIdReused)
    replayed, none = results[3]
    assert (replayed.id, none) == (earlier.id, None)
    assert isinstance(results[4], RequestIdReused)
    bobs, change = results[5]
    assert change is not None
    assert bobs.user_id == BOB
    assert await count(store, DeploymentRow) == 3
    assert await count(store, OutboxRow) == 3


async def test_a_group_never_exceeds_a_quota(store: Counting) -> None:
    quotas = Quotas(deployments=4, cpu=None, memory_mb=None, storage_gb=None, stored_mb=None)
    await store.create(new("before"), outbox, quotas=quotas)
    news = [new(f"app-{index}") for index in range(6)] + [new(f"bob-{index}", user_id=BOB) for index in range(5)]
    results = await create_all(store, news, quotas=quotas)
    alices, bobs = results[:6], results[6:]
    # Three more fit beside the one before: the first three of the group.
    assert all(isinstance(result, tuple) for result in alices[:3])
    for refused in alices[3:]:
        assert isinstance(refused, ServiceError)
        assert (refused.code, refused.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED")
        assert refused.metadata["used"] == "4"
    assert all(isinstance(result, tuple) for result in bobs[:4])
    assert isinstance(bobs[4], ServiceError)
    assert await count(store, DeploymentRow, DeploymentRow.user_id == ALICE) == 4
    assert await count(store, DeploymentRow, DeploymentRow.user_id == BOB) == 4


async def test_a_refused_create_of_a_name_leaves_it_to_the_next_in_the_group(store: Counting) -> None:
    quotas = Quotas(deployments=1, cpu=None, memory_mb=None, storage_gb=None, stored_mb=None)
    big = dataclasses.replace(new("same"), demand=Usage(deployments=2))
    results = await create_all(store, [big, new("same")], quotas=quotas)
    assert isinstance(results[0], ServiceError)
    row, change = results[1]
    assert change is not None
    assert row.name == "same"


async def test_a_name_taken_by_another_writer_during_the_group_is_answered_precisely(
    store: Counting, database_url: str
) -> None:
    """Another process takes a name while a group is written: the group cannot see it in its look
    (not committed yet), so its insert fails; each create is then written alone."""
    other = DeploymentStore(db.make_engine(database_url))
    try:
        async with other.transaction() as session:
            session.add(
                DeploymentRow(
                    id=str(uuid.uuid4()),
                    user_id=ALICE,
                    cluster_id=str(uuid.uuid4()),
                    name="raced",
                    live_name="raced",
                    app_type="web_app",
                    status="pending",
                    geographic_region="eu",
                    spec={},
                    request_hash="x",
                    created_at=now(),
                    updated_at=now(),
                )
            )
            await session.flush()
            group = asyncio.ensure_future(create_all(store, [new("fine"), new("raced"), new("fine-too")]))
            # The group waits for this transaction (SQLite: its write lock; PostgreSQL: the name's index entry).
            await asyncio.sleep(0.5)
            assert not group.done()
        results = await group
    finally:
        await other.engine.dispose()
    assert results[0][0].name == "fine"
    assert isinstance(results[1], NameTaken)
    assert results[1].existing_id is not None
    assert results[2][0].name == "fine-too"
    assert await count(store, DeploymentRow) == 3


async def test_a_lone_create_of_a_taken_name_is_answered_with_its_holder(store: Counting) -> None:
    # Alone, a create looks nothing up first: the name's unique index refuses it, and the answer still
    # names the deployment that holds the name.
    holder, _ = await store.create(new("held"), outbox)
    with pytest.raises(NameTaken) as taken:
        await store.create(new("held"), outbox)
    assert taken.value.existing_id == holder.id
    row, change = await store.create(new("held", user_id=BOB), outbox)
    assert change is not None
    assert row.user_id == BOB
    assert await count(store, DeploymentRow) == 2
    assert await count(store, EventRow) == 2
    assert await count(store, ReleaseRow) == 2
    assert await count(store, OutboxRow) == 2
    assert store.commits == 2


async def test_a_lone_create_is_one_call_to_the_driver(store: Counting, monkeypatch: pytest.MonkeyPatch) -> None:
    """A create with nothing to look up goes past SQLAlchemy: on SQLite its four inserts and the commit
    are one trip to aiosqlite's thread, on PostgreSQL one statement (the first three inserts in a WITH)."""
    await store.create(new("warm"), outbox)
    calls = driver_calls(monkeypatch, store.engine.dialect.name)
    row, change = await store.create(new("alone"), outbox)
    monkeypatch.undo()
    assert calls == (["_run_committed"] if store.engine.dialect.name == "sqlite" else ["WITH"])
    assert change is not None
    assert await count(store, EventRow, EventRow.deployment_id == row.id) == 1
    assert await count(store, ReleaseRow, ReleaseRow.deployment_id == row.id) == 1
    assert await count(store, OutboxRow, OutboxRow.payload == row.id.encode()) == 1
    assert store.commits == 2
