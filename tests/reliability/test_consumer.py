"""The JetStream consumer loop against a real nats-server: a message is handed over as soon as it is
stored, what waits is taken at once, and a handler slower than the ack wait keeps its message."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from apphosting import bus
from apphosting.nats_server import NatsServer
from tests.support.stack import eventually

STREAM = "CONSUMER_TEST"
SUBJECT = "consumer.test"


@pytest.fixture
async def js(nats_server: NatsServer) -> AsyncIterator[JetStreamContext]:
    nc = await bus.connect(nats_server.url, "consumer-test")
    try:
        js = nc.jetstream()
        await js.add_stream(name=STREAM, subjects=[SUBJECT])
        yield js
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def consuming(js: JetStreamContext, handler: bus.Handler, concurrency: int = 1) -> AsyncIterator[None]:
    stopping = asyncio.Event()
    consumer = bus.Consumer(js, STREAM, "test", SUBJECT, handler, concurrency=concurrency, stopping=stopping)
    task = asyncio.create_task(consumer.run())
    try:
        yield
    finally:
        stopping.set()
        await task


async def test_a_message_stored_while_a_pull_waits_is_handled_without_waiting_for_the_pull_to_end(
    js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pull that stays open far longer than the test may take: the message must come through it.
    monkeypatch.setattr(bus, "PULL_WAIT", 600.0)
    handled: list[bytes] = []

    async def handler(msg: Msg) -> None:
        handled.append(msg.data)
        await msg.ack()

    async with consuming(js, handler, concurrency=8):

        async def pull_waiting() -> bool:
            with contextlib.suppress(Exception):
                waiting: int = (await js.consumer_info(STREAM, "test")).num_waiting or 0
                return waiting >= 1
            return False

        await eventually(pull_waiting, within=60)
        for n in range(3):
            await bus.publish(js, SUBJECT, f"m{n}".encode(), f"m{n}")

            async def handled_so_far(n: int = n) -> bool:
                return len(handled) == n + 1

            await eventually(handled_so_far, within=60)
    assert handled == [b"m0", b"m1", b"m2"]


async def test_messages_waiting_are_all_handed_over_at_once(js: JetStreamContext) -> None:
    for n in range(40):
        await bus.publish(js, SUBJECT, f"m{n}".encode(), f"m{n}")
    in_hand: set[bytes] = set()
    handled: list[bytes] = []
    release = asyncio.Event()

    async def handler(msg: Msg) -> None:
        in_hand.add(msg.data)
        await release.wait()
        handled.append(msg.data)
        await msg.ack()

    async with consuming(js, handler, concurrency=32):

        async def all_slots_busy() -> bool:
            return len(in_hand) == 32

        # The applier of the API relies on this: a burst is in hand together, written in one commit.
        await eventually(all_slots_busy, within=60)
        release.set()

        async def all_handled() -> bool:
            return len(handled) == 40

        await eventually(all_handled, within=60)
    assert sorted(handled) == sorted(f"m{n}".encode() for n in range(40))


async def test_a_handler_slower_than_the_ack_wait_keeps_its_message(
    js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bus, "ACK_WAIT", 2.0)
    monkeypatch.setattr(bus, "BACKOFF", [2.0, 2.0])
    monkeypatch.setattr(bus, "HEARTBEAT", 0.4)
    deliveries: list[int] = []

    async def slow(msg: Msg) -> None:
        deliveries.append(msg.metadata.num_delivered)
        await asyncio.sleep(6.0)
        await msg.ack()

    # Two workers on the same durable consumer: a redelivery would reach the idle one.
    async with consuming(js, slow), consuming(js, slow):
        await bus.publish(js, SUBJECT, b"slow", "slow")

        async def acked() -> bool:
            info = await js.consumer_info(STREAM, "test")
            return (info.num_ack_pending, info.delivered.stream_seq) == (0, 1)

        await eventually(lambda: _started(deliveries), within=60)
        await eventually(acked, within=60)
    assert deliveries == [1]


async def _started(deliveries: list[int]) -> bool:
    return bool(deliveries)


async def test_with_every_slot_busy_no_more_messages_are_taken(
    js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Short pulls, so that many would have come and gone while the handlers hold their slots.
    monkeypatch.setattr(bus, "PULL_WAIT", 0.2)
    monkeypatch.setattr(bus, "PULL_GRACE", 0.2)
    for n in range(10):
        await bus.publish(js, SUBJECT, f"m{n}".encode(), f"m{n}")
    in_hand: list[bytes] = []
    release = asyncio.Event()

    async def handler(msg: Msg) -> None:
        in_hand.append(msg.data)
        await release.wait()
        await msg.ack()

    async with consuming(js, handler, concurrency=2):

        async def slots_busy() -> bool:
            return len(in_hand) == 2

        await eventually(slots_busy, within=60)
        await asyncio.sleep(2.0)
        # A message taken without a slot for it would sit unhandled while its ack wait runs.
        assert (await js.consumer_info(STREAM, "test")).num_ack_pending == 2
        release.set()

        async def all_handled() -> bool:
            return len(in_hand) == 10

        await eventually(all_handled, within=60)
