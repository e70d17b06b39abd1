"""Group commit: the requests that arrive while a batch is being handled wait, and are handled together next."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Answer = TypeVar("Answer")


class Batcher(Generic[Item, Answer]):
    """Hands the items asked at one moment to `handle` together, at most `most` at a time, in the order asked.

    `handle` answers each item of its batch, in order. Each caller gets its own item's answer; when
    `handle` raises, every caller of that batch gets the error. A caller that gave up (its task was
    cancelled) before its batch began is left out of it. One task handles the batches while items
    wait, so batches never overlap.
    """

    def __init__(self, handle: Callable[[Sequence[Item]], Awaitable[Sequence[Answer]]], most: int = 256) -> None:
        self._handle = handle
        self._most = most
        self._waiting: list[tuple[Item, asyncio.Future[Answer]]] = []
        self._handling: asyncio.Task[None] | None = None

    async def ask(self, item: Item) -> Answer:
        """Queues the item for the next batch and waits for its answer."""
        done: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, done))
        if self._handling is None or self._handling.done():
            self._handling = asyncio.create_task(self._run())
        return await done

    async def _run(self) -> None:
        while self._waiting:
            taken = self._waiting[: self._most]
            del self._waiting[: self._most]
            batch = [(item, done) for item, done in taken if not done.done()]
            if not batch:
                continue
            try:
                answers = await self._handle([item for item, _ in batch])
            except Exception as failure:
                for _, done in batch:
                    if not done.done():
                        done.set_exception(failure)
                continue
            except BaseException:
                # The handling task itself was cancelled (shutdown): so are its callers and the waiting ones.
                for _, done in [*batch, *self._waiting]:
                    done.cancel()
                self._waiting.clear()
                raise
            for (_, done), answer in zip(batch, answers, strict=True):
                if not done.done():
                    done.set_result(answer)
