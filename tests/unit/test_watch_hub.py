"""The watch hub's per-stream mailbox: order, waiting, and the resync that replaces an overflowing queue."""

from __future__ import annotations

import asyncio

from apphosting.v1 import deployments_pb2 as pb
from services.deployments.watch import QUEUE_LIMIT, RESYNC, Watcher, WatchHub


def _change(deployment_id: str, revision: int) -> pb.WatchDeploymentsResponse:
    return pb.WatchDeploymentsResponse(
        deployment=pb.Deployment(id=deployment_id, user_id="u"), event=pb.DeploymentEvent(revision=revision)
    )


async def _revision(watcher: Watcher) -> int:
    """The revision of the next change the watcher gets (not a resync)."""
    item = await watcher.get()
    assert item is not None
    return item.event.revision


async def test_a_watcher_gets_its_changes_in_order_and_waits_for_the_next() -> None:
    hub = WatchHub()
    with hub.watch(Watcher(user_id="u", deployment_id="d-1")) as watcher, hub.watch(Watcher(user_id="v")) as other:
        hub.notify(_change("d-1", 1))
        hub.notify(_change("d-2", 1))
        hub.notify(_change("d-1", 2))
        assert [await _revision(watcher) for _ in range(2)] == [1, 2]
        # Nothing queued: get() waits until a change is offered.
        waiting = asyncio.ensure_future(_revision(watcher))
        await asyncio.sleep(0)
        assert not waiting.done()
        hub.notify(_change("d-1", 3))
        assert await asyncio.wait_for(waiting, 10) == 3
        # Another user's watch of everything saw none of u's deployments.
        hub.notify(_change("d-3", 1))
        hub.resync()
        assert not other._items
    assert hub.open_watches == 0


async def test_a_reader_too_far_behind_gets_a_resync_instead_of_the_backlog() -> None:
    watcher = Watcher(user_id=None, deployment_id="d-1")
    for revision in range(1, QUEUE_LIMIT + 1):
        watcher.offer(_change("d-1", revision))
    assert await _revision(watcher) == 1
    watcher.offer(_change("d-1", QUEUE_LIMIT + 1))
    # The queue is full again: the backlog and the change that did not fit give way to one resync
    # (the stream reads them back from the event log), and the changes after it follow.
    watcher.offer(_change("d-1", QUEUE_LIMIT + 2))
    assert await watcher.get() is RESYNC
    watcher.offer(_change("d-1", QUEUE_LIMIT + 3))
    assert await _revision(watcher) == QUEUE_LIMIT + 3


async def test_a_cancelled_reader_loses_nothing() -> None:
    watcher = Watcher(user_id=None, deployment_id="d-1")
    reader = asyncio.ensure_future(watcher.get())
    await asyncio.sleep(0)
    reader.cancel()
    watcher.offer(_change("d-1", 1))
    assert await _revision(watcher) == 1
