"""Measures what JetStream's sync_interval costs: acknowledged publishes per second, default vs always.

    python scripts/nats_fsync_tradeoff.py

Each setting gets a fresh nats-server with file storage on this machine's disk; the figure is the
median of three runs, sequential (one publish in flight) and with 64 in flight.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import nats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from apphosting import bus
from apphosting.nats_server import NatsServer

PUBLISHES = 2000
PAYLOAD = b"x" * 600  # about a StatusEvent


async def _publish(js: nats.js.JetStreamContext) -> None:
    await js.publish(bus.event_subject("d"), PAYLOAD, headers={"Nats-Msg-Id": str(uuid.uuid4())})


async def measure(sync_interval: str | None) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp) / "jetstream", sync_interval=sync_interval)
        server.start()
        try:
            nc = await nats.connect(server.url)
            js = nc.jetstream()
            await bus.ensure_streams(js)
            started = time.perf_counter()
            for _ in range(PUBLISHES):
                await _publish(js)
            sequential = PUBLISHES / (time.perf_counter() - started)
            slots = asyncio.Semaphore(64)

            async def one() -> None:
                async with slots:
                    await _publish(js)

            started = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(PUBLISHES)))
            parallel = PUBLISHES / (time.perf_counter() - started)
            await nc.drain()
            return sequential, parallel
        finally:
            server.stop()


async def main() -> None:
    for sync_interval in (None, "always"):
        runs = [await measure(sync_interval) for _ in range(3)]
        sequential = statistics.median(r[0] for r in runs)
        parallel = statistics.median(r[1] for r in runs)
        label = sync_interval or "default (2m)"
        print(f"sync_interval={label}: {sequential:.0f}/s sequential, {parallel:.0f}/s with 64 in flight")


if __name__ == "__main__":
    asyncio.run(main())
