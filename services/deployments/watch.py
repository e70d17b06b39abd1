"""Fans applied changes out to the watch streams open on this replica."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

from apphosting.v1 import deployments_pb2 as pb

# Put in a watcher's queue when it may have missed changes: it reads them back from the event log.
RESYNC: Final = None
Item = pb.WatchDeploymentsResponse | None

QUEUE_LIMIT = 1024


class Watcher:
    """One open stream: the changes it wants, queued until the stream sends them.

    Held by every open stream, so kept small (tens of thousands per replica): slots, no queue
    object of its own (an asyncio.Queue brings three deques and their blocks, about 3 KiB), just a
    list created at the first change and the future of a reader waiting for one.
    """

    __slots__ = ("_items", "_waiter", "deployment_id", "geographic_region", "statuses", "user_id")

    def __init__(
        self,
        user_id: str | None,
        deployment_id: str | None = None,
        statuses: frozenset[int] = frozenset(),
        geographic_region: str = "",
    ) -> None:
        # user_id None: an admin's watch, which sees every user's deployments.
        self.user_id = user_id
        self.deployment_id = deployment_id
        self.statuses = statuses
        self.geographic_region = geographic_region
        self._items: list[Item] | None = None
        self._waiter: asyncio.Future[None] | None = None

    def wants(self, deployment: pb.Deployment) -> bool:
        if self.user_id is not None and deployment.user_id != self.user_id:
            return False
        if self.deployment_id is not None:
            return deployment.id == self.deployment_id
        if self.statuses and deployment.status not in self.statuses:
            return False
        return not self.geographic_region or deployment.geographic_region == self.geographic_region

    def offer(self, item: Item) -> None:
        items = self._items
        if items is None:
            self._items = [item]
        elif len(items) < QUEUE_LIMIT:
            items.append(item)
        else:
            # A reader this far behind gets the log read back to it instead of an endless queue.
            self._items = [RESYNC]
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Item:
        """The oldest change not yet taken, waiting for one if there is none."""
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._items.pop(0)
        if not self._items:
            self._items = None
        return item


class WatchHub:
    """The open watches of this replica, keyed by deployment for the common case of one-deployment watches."""

    def __init__(self) -> None:
        self._by_id: dict[str, set[Watcher]] = {}
        self._all: set[Watcher] = set()
        # Set when the replica shuts down: every stream ends, telling its client where to resume.
        self.closing = False

    @property
    def open_watches(self) -> int:
        return sum(len(w) for w in self._by_id.values()) + len(self._all)

    def notify(self, change: pb.WatchDeploymentsResponse) -> None:
        deployment = change.deployment
        for watcher in self._by_id.get(deployment.id, ()):
            watcher.offer(change)
        for watcher in self._all:
            if watcher.wants(deployment):
                watcher.offer(change)

    def resync(self) -> None:
        """Every watcher re-reads the log: changes may have been missed while the bus was away."""
        for watchers in self._by_id.values():
            for watcher in watchers:
                watcher.offer(RESYNC)

    def close(self) -> None:
        """Wakes every watcher to end its stream: the replica is going away."""
        self.closing = True
        for watcher in [*self._all, *(w for group in self._by_id.values() for w in group)]:
            watcher.offer(RESYNC)

    @contextmanager
    def watch(self, watcher: Watcher) -> Iterator[Watcher]:
        if watcher.deployment_id is None:
            self._all.add(watcher)
        else:
            self._by_id.setdefault(watcher.deployment_id, set()).add(watcher)
        if self.closing:
            watcher.offer(RESYNC)
        try:
            yield watcher
        finally:
            if watcher.deployment_id is None:
                self._all.discard(watcher)
            else:
                group = self._by_id.get(watcher.deployment_id)
                if group is not None:
                    group.discard(watcher)
                    if not group:
                        del self._by_id[watcher.deployment_id]
