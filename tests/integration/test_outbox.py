"""The outbox shared by API replicas: a row one relay sent is forgotten without touching a newer one."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from services.deployments.store import DeploymentStore
from services.deployments.tables import OutboxRow


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
