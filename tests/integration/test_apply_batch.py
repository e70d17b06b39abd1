"""Reported changes applied in batches (the API's applier): each as if applied alone, in order."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from services.deployments import store as store_module
from services.deployments.store import (
    Change,
    DeploymentStore,
    EventInput,
    RecordMissing,
    TransitionRejected,
    now,
)
from services.deployments.tables import DeploymentRow, EventRow, ReleaseRow
from tests.support.counting_store import Counting
from tests.support.records import new_deployment

ALICE = str(uuid.uuid4())
PLACEMENT = {"chosen_location_id": "sim-1", "candidates": [{"location_id": "sim-1", "score": 0.5, "chosen": True}]}


async def created(store: DeploymentStore, name: str) -> str:
    row, _ = await store.create(new_deployment(name, ALICE), lambda row, deployment: [])
    return row.id


def placed(deployment_id: str) -> EventInput:
    return EventInput(
        f"{deployment_id}:placed",
        "provisioning",
        "placement",
        "placed on sim-1",
        "scheduler",
        fields={"provider": "sim", "region": "eu-1", "location_id": "sim-1", "cluster_status": "provisioning"},
        release=1,
        record={"placement": PLACEMENT},
    )


def ran(deployment_id: str) -> EventInput:
    return EventInput(
        f"{deployment_id}:running",
        "running",
        "running",
        "running",
        "provisioner/0",
        fields={"endpoint_url": f"https://{deployment_id}.example", "cluster_status": "ready"},
        release=1,
        release_healthy=True,
    )


async def record(store: DeploymentStore, deployment_id: str) -> dict[str, Any]:
    """The record's columns that do not name it or say when."""
    row = await store.get(None, deployment_id)
    assert row is not None
    skip = {"seq", "id", "cluster_id", "name", "live_name", "spec", "created_at", "updated_at"}
    return {
        name: getattr(row, name)
        for name in (column.key for column in DeploymentRow.__table__.columns)
        if name not in skip
    }


async def history(store: DeploymentStore, deployment_id: str) -> list[tuple[Any, ...]]:
    async with store.session() as session:
        events = (
            await session.scalars(
                select(EventRow).where(EventRow.deployment_id == deployment_id).order_by(EventRow.revision)
            )
        ).all()
        healthy = (
            await session.scalars(
                select(ReleaseRow.healthy).where(ReleaseRow.deployment_id == deployment_id).order_by(ReleaseRow.number)
            )
        ).all()
    changes = [{name: value for name, value in event.changes.items() if name != "updated_at"} for event in events]
    return [
        (event.revision, event.status, event.phase, change) for event, change in zip(events, changes, strict=True)
    ] + [tuple(healthy)]


def without_names(value: Any, ids: Sequence[str]) -> Any:
    """`value` with the deployments' ids replaced, so that two deployments' histories compare."""
    text = repr(value)
    for deployment_id in ids:
        text = text.replace(deployment_id, "ID")
    return text


async def test_a_batch_leaves_each_record_as_its_changes_applied_one_by_one_would(store: Counting) -> None:
    # Names of one length: a record's bytes count its name.
    batched = [await created(store, f"batch-{index}") for index in range(3)]
    alone = [await created(store, f"alone-{index}") for index in range(3)]
    # Both changes of the first record in one batch, the second's running before its placement
    # (refused: early), the third's placement only.
    changes = [
        (batched[0], placed(batched[0])),
        (batched[1], ran(batched[1])),
        (batched[2], placed(batched[2])),
        (batched[0], ran(batched[0])),
        (batched[1], placed(batched[1])),
    ]
    results = await store.apply_batch(changes)
    assert [type(result) for result in results] == [Change, TransitionRejected, Change, Change, Change]
    assert isinstance(results[1], TransitionRejected)
    assert results[1].early
    for (deployment_id, change), result in zip(changes, results, strict=True):
        if isinstance(result, Change):
            # What each change answers is the record as it left it.
            assert result.deployment.id == deployment_id
            assert result.event.event_id == change.event_id
            assert result.row.status == change.status
    last = results[3]
    assert isinstance(last, Change)
    assert last.deployment.endpoint_url == f"https://{batched[0]}.example"
    assert last.row.revision == 3
    for deployment_id, change in changes:
        twin = alone[batched.index(deployment_id)]
        event = EventInput(**{**change.__dict__, "event_id": change.event_id.replace(deployment_id, twin)})
        if change.status == "running" and deployment_id == batched[1]:
            with pytest.raises(TransitionRejected):
                await store.apply(twin, event)
            continue
        fields = {name: value.replace(deployment_id, twin) for name, value in event.fields.items()}
        await store.apply(twin, EventInput(**{**event.__dict__, "fields": fields}))
    for mine, twin in zip(batched, alone, strict=True):
        assert without_names(await record(store, mine), [mine]) == without_names(await record(store, twin), [twin])
        assert without_names(await history(store, mine), [mine]) == without_names(await history(store, twin), [twin])
    assert (await record(store, batched[0]))["healthy_release"] == 1
    assert (await history(store, batched[0]))[-1] == (True,)


async def test_an_event_applied_before_or_twice_in_a_batch_changes_nothing_again(store: Counting) -> None:
    first = await created(store, "first")
    second = await created(store, "second")
    await store.apply(first, placed(first))
    results = await store.apply_batch(
        [
            (first, placed(first)),
            (second, placed(second)),
            (second, placed(second)),
            (str(uuid.uuid4()), placed(first)),
        ]
    )
    assert results[0] is None
    assert isinstance(results[1], Change)
    assert results[2] is None
    assert isinstance(results[3], RecordMissing)
    assert (await record(store, first))["revision"] == 2
    assert (await record(store, second))["revision"] == 2


async def test_a_late_event_is_logged_without_changing_the_record(store: Counting) -> None:
    deployment_id = await created(store, "late")
    early = EventInput(**{**placed(deployment_id).__dict__, "time": now() - timedelta(hours=1)})
    results = await store.apply_batch([(deployment_id, ran(deployment_id)), (deployment_id, early)])
    # The running report arrived before its placement: refused, and the placement applied.
    assert isinstance(results[0], TransitionRejected)
    assert isinstance(results[1], Change)
    results = await store.apply_batch([(deployment_id, ran(deployment_id))])
    assert isinstance(results[0], Change)
    stale = EventInput(**{**placed(deployment_id).__dict__, "event_id": "again", "time": now() - timedelta(hours=1)})
    results = await store.apply_batch([(deployment_id, stale)])
    assert isinstance(results[0], Change)
    after = await record(store, deployment_id)
    assert (after["status"], after["revision"]) == ("running", 4)


async def test_a_record_another_writer_changed_after_the_batch_read_it_is_applied_again(
    store: Counting, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = [await created(store, f"raced-{index}") for index in range(3)]
    # Another replica's store on the same database.
    other = DeploymentStore(store.engine)
    look_up = store_module._Batch.look_up
    raced = False

    async def racing(batch: Any, event_ids: Sequence[str]) -> None:
        await look_up(batch, event_ids)
        nonlocal raced
        if not raced:
            # After the batch read the records, before it writes them.
            raced = True
            await other.apply(ids[1], EventInput(f"{ids[1]}:other", "provisioning", "preparing", "other", "scheduler"))

    monkeypatch.setattr(store_module._Batch, "look_up", racing)
    results = await store.apply_batch([(deployment_id, placed(deployment_id)) for deployment_id in ids])
    assert raced
    # The batch wrote nothing; each change was applied again on its own, the raced one after the
    # other replica's.
    assert all(isinstance(result, Change) for result in results)
    assert [(await record(store, deployment_id))["revision"] for deployment_id in ids] == [2, 3, 2]
    phases = [event[2] for event in (await history(store, ids[1]))[:-1]]
    assert phases == ["accepted", "preparing", "placement"]


async def test_phase_events_reads_the_events_of_the_deployments_asked_in_the_phases_asked(store: Counting) -> None:
    ids = [await created(store, f"phases-{index}") for index in range(3)]
    await store.apply_batch([(ids[0], placed(ids[0])), (ids[1], placed(ids[1]))])
    await store.apply_batch([(ids[0], ran(ids[0]))])

    # Three ids and one nobody has: padded to four, each event read once.
    found = await store.phase_events([*ids, "nobody"], ("placement",))
    assert sorted((event["deployment_id"], event["phase"]) for event in found) == sorted(
        [(ids[0], "placement"), (ids[1], "placement")]
    )
    for event in found:
        assert event["revision"] == 2
        assert event["time"].tzinfo is not None
    both = await store.phase_events([ids[0]], ("placement", "running"))
    assert sorted(event["phase"] for event in both) == ["placement", "running"]
