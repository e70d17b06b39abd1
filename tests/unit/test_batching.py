"""The kernel's group commit: callers asking at one moment are handled in one batch, each answered alone."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from apphosting.batching import Batcher


class _Doubler:
    """Doubles each item; records its batches; can be told to fail or to wait before answering."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_on: int | None = None
        self.entered = asyncio.Event()

    async def handle(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        self.entered.set()
        await self.gate.wait()
        if self.fail_on in items:
            raise ValueError(f"refused {self.fail_on}")
        return [item * 2 for item in items]


async def test_items_asked_while_a_batch_runs_share_the_next_batch_in_order() -> None:
    doubler = _Doubler()
    doubler.gate.clear()
    batcher = Batcher(doubler.handle, most=3)
    first = asyncio.ensure_future(batcher.ask(1))
    await doubler.entered.wait()
    rest = [asyncio.ensure_future(batcher.ask(item)) for item in (2, 3, 4, 5)]
    await asyncio.sleep(0)
    doubler.gate.set()

    assert await asyncio.gather(first, *rest) == [2, 4, 6, 8, 10]
    assert doubler.batches == [[1], [2, 3, 4], [5]]


async def test_a_failed_batch_fails_its_own_callers_only() -> None:
    doubler = _Doubler()
    doubler.gate.clear()
    doubler.fail_on = 3
    batcher = Batcher(doubler.handle, most=2)
    asked = [asyncio.ensure_future(batcher.ask(item)) for item in (1, 2, 3, 4, 5)]
    await asyncio.sleep(0)
    doubler.gate.set()

    results = await asyncio.gather(*asked, return_exceptions=True)

    assert results[:2] == [2, 4]
    assert all(isinstance(result, ValueError) for result in results[2:4])
    assert results[4] == 10


async def test_a_caller_that_gave_up_is_left_out_of_its_batch() -> None:
    doubler = _Doubler()
    doubler.gate.clear()
    batcher = Batcher(doubler.handle)
    first = asyncio.ensure_future(batcher.ask(1))
    await doubler.entered.wait()
    gone = asyncio.ensure_future(batcher.ask(2))
    kept = asyncio.ensure_future(batcher.ask(3))
    await asyncio.sleep(0)
    gone.cancel()
    doubler.gate.set()

    assert await first == 2
    assert await kept == 6
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert doubler.batches == [[1], [3]]
