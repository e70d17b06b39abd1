"""The outbox: a row one relay sent is forgotten without touching a newer one, and no wake-up is lost."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import pytest

from apphosting import bus
from services.deployments import app
from services.deployments.app import ApiServer
from services.deployments.store import UNSENT_MOST, DeploymentStore, Unsent
from services.deployments.tables import OutboxRow
from tests.e2e.test_pipeline import request
from tests.support.driver_calls import driver_calls

if TYPE_CHECKING:
    from apphosting.v1.deployments_pb2_grpc import DeploymentServiceAsyncStub


async def _write(store: DeploymentStore, name: str) -> None:
    async with store.transaction() as session:
        session.add(
            OutboxRow(id=str(uuid.uuid4()), subject=f"test.{name}", payload=name.encode(), created_at=datetime.now(UTC))
        )


async def test_a_row_sent_by_two_relays_does_not_take_a_newer_row_with_it(store: DeploymentStore) -> None:
    """Two API replicas relay the same rows. When one has sent and forgotten the last row and a new
    row is written before the other finishes sending it (a publish is slow while a NATS node is
    lost), the other's forgetting must not drop the new row: it was never sent, and its deployment
    would wait for a request that never comes."""
    await _write(store, "first")
    seen_by_one = await store.unsent()
    seen_by_other = await store.unsent()
    await store.mark_sent(seen_by_other)
    await _write(store, "second")
    await store.mark_sent(seen_by_one)
    assert [row.subject for row in await store.unsent()] == ["test.second"]


async def test_forgetting_sent_rows_is_one_call_to_the_driver(
    store: DeploymentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The delete is one statement committed by itself: on PostgreSQL one asyncpg call outside any
    transaction (no BEGIN or COMMIT trips), on SQLite one trip to aiosqlite's thread, which runs and
    commits it."""
    for name in ("a", "b", "c"):
        await _write(store, name)
    sent = await store.unsent()
    await _write(store, "later")
    calls = driver_calls(monkeypatch, store.engine.dialect.name)
    await store.mark_sent(sent)
    monkeypatch.undo()
    assert calls == (["_run_committed"] if store.engine.dialect.name == "sqlite" else ["DELETE"])
    assert [row.subject for row in await store.unsent()] == ["test.later"]


async def test_a_create_committed_while_the_relay_reads_is_sent_without_waiting_for_its_next_poll(
    api: ApiServer, stub: DeploymentServiceAsyncStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay's read can begin before a create commits and end after the create woke the relay.
    That wake-up must not be lost: the create's placement request would wait for the next poll."""
    held, release = asyncio.Event(), asyncio.Event()
    armed = [True]
    read = DeploymentStore.unsent

    async def unsent(self: DeploymentStore, limit: int = UNSENT_MOST) -> list[Unsent]:
        rows = await read(self, limit)
        if armed:
            # This read's answer is kept until the create below has committed and woken the relay.
            armed.clear()
            held.set()
            await release.wait()
        return rows

    monkeypatch.setattr(DeploymentStore, "unsent", unsent)
    # The relay's next read: its poll of an empty outbox.
    await asyncio.wait_for(held.wait(), timeout=30)
    # From now on the next poll would come too late for the deadline below: only the wake-up sends.
    monkeypatch.setattr(app, "RELAY_POLL_SECONDS", 3600.0)
    await stub.CreateAppHostingDeployment(request("raced"))
    assert [row.subject for row in await api.store.unsent()] == [bus.PLACEMENT_SUBJECT]
    release.set()
    deadline = asyncio.get_running_loop().time() + 30
    while await api.store.unsent():
        assert asyncio.get_running_loop().time() < deadline, "the create's request was not sent"
        await asyncio.sleep(0.05)
