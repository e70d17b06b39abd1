"""Closed-loop load: N workers call back to back, bounded by a request count and a deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from bench.stats import summary

Call = Callable[[int], Awaitable[Any]]


@dataclass
class LoadResult:
    concurrency: int
    completed: int = 0
    errors: int = 0
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    first_error: str = ""

    @property
    def rps(self) -> float:
        return self.completed / self.elapsed if self.elapsed > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "rps": round(self.rps, 1),
            "errors": self.errors,
            **({"first_error": self.first_error} if self.first_error else {}),
            **summary(self.latencies),
        }


async def closed_loop(
    call: Call, *, concurrency: int, max_requests: int, duration: float, start: int = 0
) -> LoadResult:
    """Runs call(i) for i = start, start+1, ... from `concurrency` workers until either bound is hit."""
    result = LoadResult(concurrency)
    issued = start
    end = start + max_requests
    began = time.perf_counter()
    deadline = began + duration

    async def worker() -> None:
        nonlocal issued
        while issued < end and time.perf_counter() < deadline:
            index = issued
            issued += 1
            t0 = time.perf_counter()
            try:
                await call(index)
            except Exception as exc:
                result.errors += 1
                if not result.first_error:
                    result.first_error = f"{type(exc).__name__}: {exc}"[:300]
                continue
            result.latencies.append(time.perf_counter() - t0)
            result.completed += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.elapsed = time.perf_counter() - began
    return result
