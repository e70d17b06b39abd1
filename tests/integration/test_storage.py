"""What a deployment costs in the database: bounded by its request, with a history a resumed watch can replay."""

from __future__ import annotations

import random
import string
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from alembic import command
from alembic.config import Config
from google.protobuf import json_format
from sqlalchemy import Connection, column, select, table, text

from apphosting import db
from apphosting.settings import Limits
from apphosting.v1 import deployments_pb2 as pb
from services.deployments.app import MIGRATIONS, VERSION_TABLE
from services.deployments.auth import LOCAL_USER_ID
from services.deployments.convert import STATUSES, timestamp
from services.deployments.quotas import Quotas
from services.deployments.store import DeploymentStore, long_histories
from services.deployments.tables import Base, DeploymentRow
from tests.e2e.test_pipeline import SETTLED, watch
from tests.integration.test_api import expect_error
from tests.support.stack import Stack, eventually

if TYPE_CHECKING:
    from apphosting.v1.deployments_pb2_grpc import DeploymentServiceAsyncStub as Stub

# A retry of a failing deployment may add its few events, not another copy of the request.
RETRY_BYTES_MAX = 16 * 1024


def _noise(size: int, seed: int) -> str:
    """Letters that do not compress, so no engine's compression flatters the measure."""
    rng = random.Random(seed)
    return "".join(rng.choices(string.ascii_letters, k=size))


def maximum_request(name: str, **fields: Any) -> pb.CreateAppHostingDeploymentRequest:
    """A request with `config`, `custom_values_yaml` and environment variables at their size limits."""
    limits = Limits()
    per_value = limits.environment_value_max_bytes - 16
    count = limits.environment_total_max_bytes // (per_value + 8)
    body: dict[str, Any] = {
        "geographic_region": "eu",
        "deployment_name": name,
        "app_type": "helm",
        "helm_repo_url": "https://charts.example.com",
        "helm_chart_name": "podinfo",
        # {"k":"…"} is 8 bytes besides the value.
        "config": {"k": _noise(limits.config_max_bytes - 8, 1)},
        "custom_values_yaml": "a: " + _noise(limits.custom_values_yaml_max_bytes - 3, 2),
        "environment_variables": [f"V{i}=" + _noise(per_value, 3 + i) for i in range(count)],
    }
    body.update(fields)
    body = {key: value for key, value in body.items() if value is not None}
    return json_format.ParseDict(body, pb.CreateAppHostingDeploymentRequest())


async def rows_bytes(database_url: str, deployment_id: str) -> int:
    """The bytes of every value in the deployment's rows (record, events) and in every outbox row.

    What the engine must store, before its own overhead: text and JSON as UTF-8, binary as is,
    numbers, times and flags at 8 bytes.
    """
    engine = db.make_engine(database_url)
    total = 0
    try:
        async with engine.connect() as connection:
            for query in (
                "SELECT * FROM deployments WHERE id = :id",
                "SELECT * FROM deployment_events WHERE deployment_id = :id",
                "SELECT * FROM outbox",
            ):
                for row in (await connection.execute(text(query), {"id": deployment_id})).all():
                    for value in row:
                        if isinstance(value, bytes):
                            total += len(value)
                        elif isinstance(value, str):
                            total += len(value.encode())
                        elif isinstance(value, dict | list):
                            total += len(str(value).encode())
                        elif value is not None:
                            total += 8
    finally:
        await engine.dispose()
    return total


async def sqlite_used_bytes(database_url: str) -> int:
    """The SQLite file's pages in use (free pages left out) once the write-ahead log is checkpointed."""
    engine = db.make_engine(database_url)
    try:
        async with engine.connect() as connection:
            await connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            pages = (await connection.exec_driver_sql("PRAGMA page_count")).scalar_one()
            free = (await connection.exec_driver_sql("PRAGMA freelist_count")).scalar_one()
            size = (await connection.exec_driver_sql("PRAGMA page_size")).scalar_one()
    finally:
        await engine.dispose()
    return int((pages - free) * size)


async def outbox_drained(stack: Stack) -> None:
    store = stack.apis[0].store

    async def empty() -> bool:
        return not await store.unsent()

    await eventually(empty)


async def test_a_maximum_size_deployment_stores_at_most_twice_its_request(stack: Stack, pipeline: Stub) -> None:
    request = maximum_request("biggest")
    request_bytes = len(request.SerializeToString())
    assert request_bytes > 550_000
    sqlite = stack.database_url.startswith("sqlite")
    before = await sqlite_used_bytes(stack.database_url) if sqlite else 0

    created = await pipeline.CreateAppHostingDeployment(request)
    items = await watch(pipeline, created.id, until=SETTLED)
    assert items[-1].deployment.status == pb.DEPLOYMENT_STATUS_RUNNING
    await outbox_drained(stack)

    stored = await rows_bytes(stack.database_url, created.id)
    print(f"request {request_bytes} B; rows {stored} B ({stored / request_bytes:.2f}x)")
    assert stored <= 2 * request_bytes
    if sqlite:
        grown = await sqlite_used_bytes(stack.database_url) - before
        print(f"SQLite pages in use grew by {grown} B ({grown / request_bytes:.2f}x)")
        assert grown <= 2 * request_bytes
    # The quota counts it, about as the database holds it.
    counted = (await stack.apis[0].store.usage(LOCAL_USER_ID)).stored_bytes
    assert request_bytes <= counted <= 2 * request_bytes


async def test_a_retry_of_a_failing_deployment_adds_a_small_bounded_amount(stack: Stack, pipeline: Stub) -> None:
    request = maximum_request(
        "failing",
        app_type="web_app",
        helm_repo_url=None,
        helm_chart_name=None,
        custom_values_yaml=None,
        docker_image="ghcr.io/acme/fail-permanent:1.0.0",
    )
    created = await pipeline.CreateAppHostingDeployment(request)
    items = await watch(pipeline, created.id, until=SETTLED)
    assert items[-1].deployment.status == pb.DEPLOYMENT_STATUS_FAILED
    await outbox_drained(stack)
    before = await rows_bytes(stack.database_url, created.id)

    for _ in range(3):
        retried = await pipeline.RetryDeployment(pb.RetryDeploymentRequest(id=created.id))
        items = await watch(pipeline, created.id, since=retried.revision, until=SETTLED)
        assert items[-1].deployment.status == pb.DEPLOYMENT_STATUS_FAILED
    await outbox_drained(stack)

    grown = await rows_bytes(stack.database_url, created.id) - before
    print(f"three retries grew the rows by {grown} B")
    assert grown <= 3 * RETRY_BYTES_MAX


async def replay(stub: Stub, deployment_id: str, since: int, until: int) -> list[pb.WatchDeploymentResponse]:
    return await watch(stub, deployment_id, since=since, limit=until - since)


async def test_resumed_watches_rebuild_each_revision_exactly_after_trimming(stack: Stack) -> None:
    pipeline = await stack.add_api()
    stack.add_scheduler()
    # Each step on its own event: the log must be longer than what the trims below keep.
    stack.add_provisioner(report_window=0.0)
    created = await pipeline.CreateAppHostingDeployment(maximum_request("replayed"))
    live = await watch(pipeline, created.id, since=created.revision, until=SETTLED)
    assert live[-1].deployment.status == pb.DEPLOYMENT_STATUS_RUNNING
    top = live[-1].event.revision
    assert top > 4, f"the trims below need more than 4 revisions, the log has {top}"
    # Live items came from the change as it was applied; the replay rebuilds them from the log.
    by_revision = {item.event.revision: item for item in live if item.HasField("event")}
    assert sorted(by_revision) == list(range(2, top + 1))

    assert await replay(pipeline, created.id, 1, top) == [by_revision[r] for r in range(2, top + 1)]

    store: DeploymentStore = stack.apis[0].store
    # By count: the newest three stay, the oldest of them now a complete base.
    await store.trim_events(3)
    assert await replay(pipeline, created.id, top - 3, top) == [by_revision[r] for r in range(top - 2, top + 1)]
    # The record knows its oldest kept event, so the next round's look passes it by.
    async with store.session() as session:
        assert await session.scalar(select(DeploymentRow.events_from).where(DeploymentRow.id == created.id)) == top - 2
        assert created.id not in (await session.scalars(long_histories(3))).all()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await replay(pipeline, created.id, top - 4, top)
    assert raised.value.code() == grpc.StatusCode.OUT_OF_RANGE

    # By bytes: nothing fits, so only the newest stays, and it alone rebuilds the deployment.
    await store.trim_events(1000, keep_bytes=1)
    assert await replay(pipeline, created.id, top - 1, top) == [by_revision[top]]
    counted = (await store.usage(LOCAL_USER_ID)).stored_bytes
    assert counted <= 2 * len(maximum_request("replayed").SerializeToString())


async def test_an_existing_database_upgrades_its_snapshots_to_changes(database_url: str) -> None:
    engine = db.make_engine(database_url)

    def to_0002(connection: Connection) -> None:
        config = Config()
        config.set_main_option("script_location", MIGRATIONS)
        config.attributes.update(connection=connection, version_table=VERSION_TABLE)
        command.upgrade(config, "0002")

    moment = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
    deployment_id = "0b6f7c52-5f1a-4c3e-9a57-0d6e1f1c2a10"
    record: dict[str, Any] = {
        "id": deployment_id,
        "user_id": LOCAL_USER_ID,
        "cluster_id": "5c9a4e0e-6a51-4d3c-8d0e-2f64b1e9a7c3",
        "name": "old",
        "live_name": "old",
        "app_type": "web_app",
        "status": "running",
        "phase": "ready",
        "geographic_region": "eu",
        "spec": {"deployment_name": "old", "geographic_region": "eu", "docker_image": "nginx:1.27"},
        "request_hash": "0" * 64,
        "revision": 2,
        "endpoint_url": "https://old.example.com",
        "is_adopted": False,
        "created_at": moment,
        "updated_at": moment + timedelta(seconds=1),
    }
    snapshots = []
    for revision, status, phase, endpoint in (
        (1, "pending", "accepted", None),
        (2, "running", "ready", "https://old.example.com"),
    ):
        snapshot = pb.Deployment(
            id=deployment_id,
            status=STATUSES[status],
            phase=phase,
            revision=revision,
            updated_at=timestamp(moment + timedelta(seconds=revision - 1)),
        )
        if endpoint is not None:
            snapshot.endpoint_url = endpoint
        snapshots.append(snapshot)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(to_0002)
            # The columns of 0002 only, typed as the model types them.
            typed = Base.metadata.tables["deployments"].c
            deployments = table("deployments", *(column(name, typed[name].type) for name in record))
            await connection.execute(deployments.insert().values(record))
            for snapshot in snapshots:
                await connection.execute(
                    text(
                        "INSERT INTO deployment_events (event_id, deployment_id, revision, status, phase, message,"
                        " source, simulated, final, time, snapshot)"
                        " VALUES (:event_id, :id, :revision, 'x', 'x', 'm', 's', false, false, :time, :snapshot)"
                    ),
                    {
                        "event_id": f"e{snapshot.revision}",
                        "id": deployment_id,
                        "revision": snapshot.revision,
                        "time": moment.replace(tzinfo=None),
                        "snapshot": snapshot.SerializeToString(),
                    },
                )
            await connection.execute(
                text("INSERT INTO outbox (id, subject, payload, created_at, sent_at) VALUES ('a', 's', :p, :t, :t)"),
                {"p": b"sent", "t": moment.replace(tzinfo=None)},
            )
        await db.upgrade(engine, MIGRATIONS, VERSION_TABLE)

        store = DeploymentStore(engine)
        history = await store.history_after(deployment_id, 0)
        assert [event.changes for event, _ in history][1] == {
            "status": "running",
            "phase": "ready",
            "updated_at": (moment + timedelta(seconds=1)).isoformat(),
            "endpoint_url": "https://old.example.com",
        }
        for (_, rebuilt), snapshot in zip(history, snapshots, strict=True):
            assert (rebuilt.status, rebuilt.phase, rebuilt.revision) == (
                snapshot.status,
                snapshot.phase,
                snapshot.revision,
            )
            assert rebuilt.updated_at == snapshot.updated_at
            assert rebuilt.HasField("endpoint_url") == snapshot.HasField("endpoint_url")
        assert (await store.usage(LOCAL_USER_ID)).stored_bytes > 0
        assert await store.unsent() == []
    finally:
        await engine.dispose()


async def test_a_deleted_deployment_counts_until_it_is_purged(stack: Stack) -> None:
    """Deleting and creating again cannot grow the database without bound: a deleted record's bytes
    count in the stored_mb quota until housekeeping purges it after its retention."""
    keeping = await stack.add_api(
        quotas=Quotas(deployments=None, cpu=None, memory_mb=None, storage_gb=None, stored_mb=1),
        deleted_retention=3600.0,
    )
    stack.add_scheduler()
    stack.add_provisioner()
    first = await keeping.CreateAppHostingDeployment(maximum_request("first"))
    assert (await watch(keeping, first.id, until=SETTLED))[-1].deployment.status == pb.DEPLOYMENT_STATUS_RUNNING
    await keeping.DeleteDeployment(pb.DeleteDeploymentRequest(id=first.id))
    assert (await watch(keeping, first.id, since=1))[-1].event.final

    details = await expect_error(
        keeping.CreateAppHostingDeployment(maximum_request("second")), grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert details.metadata["quota"] == "stored_mb"
    assert (await keeping.GetDeployment(pb.GetDeploymentRequest(id=first.id))).HasField("deleted_at")

    # A replica whose housekeeping keeps deleted records no time at all purges it.
    await stack.add_api(deleted_retention=0.0, housekeeping_interval=0.05)

    async def purged() -> bool:
        return await stack.apis[0].store.get(None, first.id) is None

    await eventually(purged)
    await expect_error(keeping.GetDeployment(pb.GetDeploymentRequest(id=first.id)), grpc.StatusCode.NOT_FOUND)
    assert await rows_bytes(stack.database_url, first.id) == 0
    second = await keeping.CreateAppHostingDeployment(maximum_request("second"))
    assert second.id != first.id
