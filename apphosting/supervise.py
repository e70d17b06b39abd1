"""Keeps a process's long-lived tasks running: one that fails is logged and restarted with backoff."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backoff:
    """How soon a failed task is started again, and when a restarted one counts as up."""

    # The n-th restart in a row waits base * 2**(n-1) seconds, at most cap.
    base: float = 0.5
    cap: float = 10.0
    # A restarted task that has run this long without failing is up again. A task that fails at
    # once each time (its database is still away) stays down instead of flapping up and down.
    settle: float = 1.0


class Supervisor:
    """Runs named tasks until they return or the process stops; an unexpected exception restarts one.

    `healthy` is False while any task is down (failed and not yet settled after its restart);
    `on_change` is called whenever that may have changed, so a process can report it (gRPC health).
    """

    def __init__(
        self,
        stopping: asyncio.Event,
        *,
        backoff: Backoff | None = None,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._stopping = stopping
        self._backoff = backoff or Backoff()
        self._on_change = on_change
        self._down: set[str] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def healthy(self) -> bool:
        return not self._down

    @property
    def down(self) -> frozenset[str]:
        """The names of the tasks that are down now."""
        return frozenset(self._down)

    def start(self, name: str, run: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """Starts `run()` as a supervised task; it is called again after each unexpected exception."""
        task = asyncio.create_task(self._keep(name, run), name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _keep(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        loop = asyncio.get_running_loop()
        delay = self._backoff.base
        try:
            while True:
                settled = loop.call_later(self._backoff.settle, self._settled, name) if name in self._down else None
                started = loop.time()
                try:
                    await run()
                    return
                except asyncio.CancelledError:
                    raise
                except Exception:
                    if self._stopping.is_set():
                        log.warning("%s failed while stopping", name, exc_info=True)
                        return
                    if loop.time() - started >= self._backoff.settle:
                        # It ran well for a while: this failure starts a new series of restarts.
                        delay = self._backoff.base
                    log.exception("%s failed; restarting it in %g s", name, delay)
                    self._mark(name, True)
                finally:
                    if settled is not None:
                        settled.cancel()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=delay)
                    return
                delay = min(delay * 2, self._backoff.cap)
        finally:
            # Ended (returned, stopped or cancelled): it no longer holds the process down.
            self._mark(name, False)

    def _settled(self, name: str) -> None:
        log.info("%s is running again", name)
        self._mark(name, False)

    def _mark(self, name: str, down: bool) -> None:
        if down == (name in self._down):
            return
        if down:
            self._down.add(name)
        else:
            self._down.discard(name)
        self._on_change()
