"""The NATS ceilings: core publish→subscribe and request→reply, and a JetStream publish acknowledged."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import nats
import nats.errors
from nats.aio.msg import Msg
from nats.js.api import StorageType, StreamConfig

from bench.stats import summary

_PAYLOAD = b"x" * 512


async def pub_sub(url: str, count: int, *, rate: float | None = None, deadline: float = 20.0) -> dict[str, Any]:
    """Latency of one message from publish to the subscriber's callback, one message at a time (or paced)."""
    pub = await nats.connect(url, name="bench-pub")
    sub = await nats.connect(url, name="bench-sub")
    waiting: dict[int, tuple[float, asyncio.Future[float]]] = {}

    async def arrived(msg: Msg) -> None:
        entry = waiting.pop(int(msg.data[:12]), None)
        if entry is not None and not entry[1].done():
            entry[1].set_result(time.perf_counter() - entry[0])

    await sub.subscribe("bench.latency", cb=arrived)
    await sub.flush()
    latencies: list[float] = []
    lost = 0
    loop = asyncio.get_running_loop()
    end = time.perf_counter() + deadline
    try:
        # The first messages also wait for the subscription's interest to reach the server; not counted.
        for index in range(-20, count):
            if time.perf_counter() > end:
                break
            future: asyncio.Future[float] = loop.create_future()
            waiting[index] = (time.perf_counter(), future)
            await pub.publish("bench.latency", b"%012d" % index + _PAYLOAD)
            try:
                latency = await asyncio.wait_for(future, timeout=2.0)
            except TimeoutError:
                waiting.pop(index, None)
                lost += index >= 0
                continue
            if index >= 0:
                latencies.append(latency)
            if rate:
                await asyncio.sleep(1.0 / rate)
    finally:
        await pub.close()
        await sub.close()
    return {**summary(latencies), "lost": lost}


async def request_reply(url: str, count: int, deadline: float = 20.0) -> dict[str, Any]:
    requester = await nats.connect(url, name="bench-requester")
    responder = await nats.connect(url, name="bench-responder")

    async def answer(msg: Msg) -> None:
        await msg.respond(msg.data)

    await responder.subscribe("bench.rr", cb=answer)
    await responder.flush()
    # Until the server has the responder's interest, a request is answered "no responders".
    for _ in range(100):
        try:
            await requester.request("bench.rr", _PAYLOAD, timeout=2.0)
            break
        except nats.errors.NoRespondersError:
            await asyncio.sleep(0.02)
    latencies: list[float] = []
    end = time.perf_counter() + deadline
    try:
        for _ in range(count):
            if time.perf_counter() > end:
                break
            t0 = time.perf_counter()
            await requester.request("bench.rr", _PAYLOAD, timeout=2.0)
            latencies.append(time.perf_counter() - t0)
    finally:
        await requester.close()
        await responder.close()
    return summary(latencies)


async def jetstream_publish(url: str, count: int, deadline: float = 20.0) -> dict[str, Any]:
    """A publish to a file-backed stream until its ack: what every bus.publish of the product waits for."""
    nc = await nats.connect(url, name="bench-js")
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="BENCH", subjects=["bench.js"], storage=StorageType.FILE))
    latencies: list[float] = []
    end = time.perf_counter() + deadline
    try:
        for index in range(count):
            if time.perf_counter() > end:
                break
            t0 = time.perf_counter()
            await js.publish("bench.js", _PAYLOAD, headers={"Nats-Msg-Id": f"bench-{index}"})
            latencies.append(time.perf_counter() - t0)
        await js.delete_stream("BENCH")
    finally:
        await nc.close()
    return summary(latencies)


async def measure(url: str, count: int) -> dict[str, Any]:
    return {
        "pub_sub": await pub_sub(url, count),
        "request_reply": await request_reply(url, count),
        "jetstream_publish": await jetstream_publish(url, count),
    }
