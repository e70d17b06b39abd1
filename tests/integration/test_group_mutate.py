"""Owners' operations written together (group commit): each caller answered as if written alone."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from typing import Any

import grpc
from sqlalchemy import func, select

from apphosting.v1 import deployments_pb2 as pb
from services.deployments import operations
from services.deployments.errors import ServiceError
from services.deployments.quotas import Quotas, demand_of_spec
from services.deployments.store import (
    Change,
    DeploymentStore,
    EventInput,
    Outgoing,
    Plan,
    RecordMissing,
    TransitionRejected,
)
from services.deployments.tables import DeploymentRow, EventRow, OutboxRow, ReleaseRow
from tests.support.counting_store import Counting
from tests.support.records import new_deployment

ALICE = str(uuid.uuid4())
BOB = str(uuid.uuid4())


def outbox(row: DeploymentRow, deployment: pb.Deployment) -> list[Outgoing]:
    return [Outgoing("test.placement", f"{row.id}:{row.release}".encode())]


async def running(store: DeploymentStore, name: str, user_id: str = ALICE) -> DeploymentRow:
    """A deployment of 250 millicores that its worker reported running."""
    row, _ = await store.create(new_deployment(name, user_id), outbox)
    for status in ("provisioning", "running"):
        await store.apply(row.id, EventInput(f"{row.id}:{status}", status, status, status, "worker"))
    current = await store.get(None, row.id)
    assert current is not None
    assert current.status == "running"
    return current


def update(row: DeploymentRow, image: str, cpu: float = 0.25) -> Plan:
    """The plan of an image update made from `row`, as the service makes it (refused when the record moved)."""
    spec = {**row.spec, "docker_image": image, "cpu_request": cpu}

    def plan(current: DeploymentRow) -> EventInput:
        operations.precheck(current, "update", "", release=row.release)
        return operations.release_change(current, operation="update", spec=spec, actor=ALICE, reason="")

    return plan


async def mutate_all(store: DeploymentStore, calls: list[tuple[DeploymentRow, Plan]], **options: Any) -> list[Any]:
    """Asks all at once (one group: each is queued before the writer first runs); each result or error."""
    return await asyncio.gather(
        *(store.mutate(row.id, row.user_id, plan, outbox, **options) for row, plan in calls), return_exceptions=True
    )


async def count(store: DeploymentStore, table: Any, *where: Any) -> int:
    async with store.session() as session:
        return int(await session.scalar(select(func.count()).select_from(table).where(*where)) or 0)


async def test_many_concurrent_updates_share_one_commit(store: Counting) -> None:
    rows = [await running(store, f"app-{index}") for index in range(40)]
    store.commits = 0
    results = await mutate_all(store, [(row, update(row, f"nginx:{index + 2}")) for index, row in enumerate(rows)])
    assert store.commits == 1
    for index, (row, result) in enumerate(zip(rows, results, strict=True)):
        assert isinstance(result, Change)
        assert result.row.id == row.id
        assert result.deployment.release == 2
        assert result.deployment.docker_image == f"nginx:{index + 2}"
        assert result.event.revision == row.revision + 1
        stored = await store.get(ALICE, row.id)
        assert stored is not None
        assert (stored.revision, stored.release, stored.operation) == (row.revision + 1, 2, "update")
        assert stored.spec["docker_image"] == f"nginx:{index + 2}"
        assert stored.record_bytes == result.row.record_bytes
        assert stored.history_bytes == result.row.history_bytes
        release = await store.release(row.id, 2)
        assert release is not None
        assert release.operation == "update"
        # The release it replaced keeps its spec.
        first = await store.release(row.id, 1)
        assert first is not None
        assert first.spec is not None
        assert first.spec["docker_image"] == "nginx:1"
        history = await store.history_after(row.id, row.revision)
        assert [event.revision for event, _ in history] == [row.revision + 1]
    assert await count(store, ReleaseRow, ReleaseRow.number == 2) == 40
    # The relay sends in seq order: the group's rows are in the order the calls came.
    sent = [message.payload.decode() for message in await store.unsent()]
    assert sent[-40:] == [f"{row.id}:2" for row in rows]


async def test_each_refusal_goes_to_its_caller_only(store: Counting) -> None:
    first, second, third = [await running(store, f"app-{index}") for index in range(3)]
    events = await count(store, EventRow)

    def to_pending(current: DeploymentRow) -> EventInput:
        # running -> pending is not a move of the lifecycle.
        return EventInput(f"api:{current.id}:bad:{current.revision}", "pending", "x", "back to pending", "api")

    missing = DeploymentRow(id=str(uuid.uuid4()), user_id=ALICE)
    calls = [
        (first, update(first, "nginx:2")),
        # The same record again, planned from the same read: it moved (another update is in flight).
        (first, update(first, "nginx:3")),
        (second, to_pending),
        (missing, update(first, "nginx:4")),
        # Another owner's record is not found for this caller.
        (DeploymentRow(id=third.id, user_id=BOB), update(third, "nginx:5")),
        (third, update(third, "nginx:6")),
    ]
    store.commits = 0
    results = await mutate_all(store, calls)
    assert store.commits == 1
    assert isinstance(results[0], Change)
    assert results[0].deployment.docker_image == "nginx:2"
    assert isinstance(results[1], ServiceError)
    assert results[1].code == grpc.StatusCode.ABORTED
    assert isinstance(results[2], TransitionRejected)
    assert isinstance(results[3], RecordMissing)
    assert isinstance(results[4], RecordMissing)
    assert isinstance(results[5], Change)
    assert results[5].deployment.docker_image == "nginx:6"
    # Only the two accepted updates wrote anything.
    assert await count(store, EventRow) == events + 2
    for row, image in ((first, "nginx:2"), (third, "nginx:6")):
        stored = await store.get(None, row.id)
        assert stored is not None
        assert (stored.revision, stored.spec["docker_image"]) == (row.revision + 1, image)
    stored_second = await store.get(None, second.id)
    assert stored_second is not None
    assert (stored_second.status, stored_second.revision) == ("running", second.revision)


async def test_a_quota_is_checked_in_order_within_a_group(store: Counting) -> None:
    # 4 x 250m held of 1.5 cores; each update asks 600m.
    quotas = Quotas(cpu=1.5, deployments=None, memory_mb=None, storage_gb=None, stored_mb=None)
    rows = [await running(store, f"app-{index}") for index in range(4)]
    rows.append(await running(store, "bobs", user_id=BOB))
    calls = [(row, update(row, "nginx:2", cpu=0.6)) for row in rows]
    demands = [demand_of_spec({**row.spec, "cpu_request": 0.6}) for row in rows]
    store.commits = 0
    results = await asyncio.gather(
        *(
            store.mutate(row.id, row.user_id, plan, outbox, quotas=quotas, demand=demand)
            for (row, plan), demand in zip(calls, demands, strict=True)
        ),
        return_exceptions=True,
    )
    assert store.commits == 1
    # 1000m held, +350m: fits; the next would make 1700m, as it would after the first's commit.
    assert isinstance(results[0], Change)
    for refused in results[1:4]:
        assert isinstance(refused, ServiceError)
        assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.reason == "QUOTA_EXCEEDED"
    # Another owner's quota is their own.
    assert isinstance(results[4], Change)
    used = await store.usage(ALICE)
    assert used.cpu_millis == 600 + 3 * 250


async def test_a_group_that_meets_a_conflict_is_written_one_by_one(store: Counting) -> None:
    rows = [await running(store, f"app-{index}") for index in range(5)]
    taken = f"{rows[0].id}:running"
    tries = 0

    def clashing(current: DeploymentRow) -> EventInput:
        # The first try names an event id already stored (the group's insert fails), the next a new one.
        nonlocal tries
        tries += 1
        change = update(rows[2], "nginx:clash")(current)
        return EventInput(**{**change.__dict__, "event_id": taken if tries == 1 else change.event_id})

    calls = [(row, update(row, f"nginx:{index + 2}")) for index, row in enumerate(rows)]
    calls[2] = (rows[2], clashing)
    calls.append((rows[0], update(rows[0], "nginx:again")))
    store.commits = 0
    results = await mutate_all(store, calls)
    assert tries == 2
    # Written alone, each answered as before: five updates, the repeat of the first refused.
    assert store.commits == 5
    assert [isinstance(result, Change) for result in results] == [True] * 5 + [False]
    assert isinstance(results[5], ServiceError)
    assert results[2].deployment.docker_image == "nginx:clash"
    assert await count(store, ReleaseRow, ReleaseRow.number == 2) == 5
    assert await count(store, OutboxRow) == 5 + 5


def chained(image: str) -> Plan:
    """An image update planned on the record as it is when written (not refused when it moved)."""

    def plan(current: DeploymentRow) -> EventInput:
        spec = {**current.spec, "docker_image": image}
        return operations.release_change(current, operation="update", spec=spec, actor=ALICE, reason="")

    return plan


async def test_updates_of_one_record_in_one_group_keep_each_releases_spec(store: Counting) -> None:
    row, other = [await running(store, f"app-{index}") for index in range(2)]
    calls = [(row, chained("nginx:2")), (other, chained("nginx:5")), (row, chained("nginx:3"))]
    store.commits = 0
    results = await mutate_all(store, calls)
    assert store.commits == 1
    assert [result.deployment.release for result in results] == [2, 2, 3]
    stored = await store.get(None, row.id)
    assert stored is not None
    assert (stored.release, stored.spec["docker_image"]) == (3, "nginx:3")
    # Release 2 was made and replaced in the same transaction: it keeps its own spec.
    specs = {number: (await store.release(row.id, number)) for number in (1, 2, 3)}
    assert {number: release.spec["docker_image"] for number, release in specs.items() if release and release.spec} == {
        1: "nginx:1",
        2: "nginx:2",
        3: "nginx:3",
    }
    async with store.session() as session:
        kept = (await session.scalars(select(ReleaseRow.spec).where(ReleaseRow.deployment_id == row.id))).all()
    # The current release's spec is the record's, stored once.
    assert sorted(spec["docker_image"] if spec else "" for spec in kept) == ["", "nginx:1", "nginx:2"]
    sent = [message.payload.decode() for message in await store.unsent()]
    assert sent[-3:] == [f"{row.id}:2", f"{other.id}:2", f"{row.id}:3"]


def failed(deployment_id: str, release: int) -> EventInput:
    return EventInput(
        f"{deployment_id}:failed:{release}",
        "running",
        "rollout_failed",
        "the rollout did not become ready",
        "provisioner/0",
        release=release,
        release_failed=True,
    )


async def test_a_rollback_that_fails_in_the_same_batch_as_it_was_made_is_not_rolled_back_again(
    store: Counting,
) -> None:
    row = await running(store, "app")
    healthy = EventInput(f"{row.id}:healthy", "running", "running", "running", "provisioner/0", release=1)
    await store.apply(row.id, dataclasses.replace(healthy, release_healthy=True))
    await store.mutate(row.id, ALICE, chained("nginx:2"), outbox)
    # Release 2 fails: rolled back as release 3, which fails in the same batch.
    results = await store.apply_batch([(row.id, failed(row.id, 2)), (row.id, failed(row.id, 3))])
    assert [isinstance(result, Change) for result in results] == [True, True]
    stored = await store.get(None, row.id)
    assert stored is not None
    assert (stored.status, stored.release, stored.operation) == ("error", 3, None)
    assert stored.spec["docker_image"] == "nginx:1"
    automatic = await store.release(row.id, 3)
    assert automatic is not None
    assert (automatic.operation, automatic.rollback_of) == ("rollback-automatic", 1)
    replaced = await store.release(row.id, 2)
    assert replaced is not None
    assert replaced.spec is not None
    assert replaced.spec["docker_image"] == "nginx:2"


async def test_a_failed_rollout_reported_through_mutate_is_rolled_back(store: Counting) -> None:
    row = await running(store, "app")
    healthy = EventInput(f"{row.id}:healthy", "running", "running", "running", "provisioner/0", release=1)
    await store.apply(row.id, dataclasses.replace(healthy, release_healthy=True))
    await store.mutate(row.id, ALICE, chained("nginx:2"), outbox)
    store.update_outbox = outbox
    store.commits = 0
    results = await mutate_all(
        store,
        [(row, lambda current: failed(current.id, 2)), (row, chained("nginx:4"))],
    )
    assert store.commits == 1
    assert [result.deployment.release for result in results] == [3, 4]
    stored = await store.get(None, row.id)
    assert stored is not None
    assert (stored.release, stored.spec["docker_image"]) == (4, "nginx:4")
    rollback = await store.release(row.id, 3)
    assert rollback is not None
    assert rollback.operation == "rollback-automatic"
    assert rollback.spec is not None
    assert rollback.spec["docker_image"] == "nginx:1"
    sent = [message.payload.decode() for message in await store.unsent()]
    assert sent[-2:] == [f"{row.id}:3", f"{row.id}:4"]
