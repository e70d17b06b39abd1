"""Watches: N WatchDeployment streams on one API process, and how fast a status event reaches them."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import time
import uuid
from typing import TYPE_CHECKING, Any

import grpc
import nats

from apphosting import bus
from apphosting.v1 import bus_pb2, deployments_pb2_grpc
from apphosting.v1 import deployments_pb2 as pb
from bench import ceilings
from bench.load import closed_loop
from bench.plan import Plan
from bench.procs import Stack, python
from bench.requests import create_request
from bench.stats import ratio, summary

if TYPE_CHECKING:
    from apphosting.v1.deployments_pb2_grpc import DeploymentServiceAsyncStub

# Issue 12: this many streams on one API process, each delivered at most GOAL_OVER_NATS_MS after raw
# NATS's p99 and holding at most GOAL_KIB_PER_STREAM of the API's memory.
GOAL_STREAMS = 10_000
GOAL_OVER_NATS_MS = 10.0
GOAL_KIB_PER_STREAM = 10.0

# Streams per client channel (one HTTP/2 connection each), well below any per-connection stream limit.
_STREAMS_PER_CHANNEL = 1000
# Streams being opened at once.
_OPENING = 200


class _Streams:
    """The client side: every open stream reads until cancelled and notes when each event arrived."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.channels: list[grpc.aio.Channel] = []
        self.stubs: list[DeploymentServiceAsyncStub] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.opened = 0
        self.failed = 0
        self.first_error = ""
        self.arrivals: list[tuple[str, float]] = []
        self._opening = asyncio.Semaphore(_OPENING)

    def _stub(self, index: int) -> DeploymentServiceAsyncStub:
        while len(self.stubs) <= index // _STREAMS_PER_CHANNEL:
            # A local subchannel pool gives each channel its own connection.
            channel = grpc.aio.insecure_channel(
                f"127.0.0.1:{self.port}", options=[("grpc.use_local_subchannel_pool", 1)]
            )
            self.channels.append(channel)
            self.stubs.append(deployments_pb2_grpc.DeploymentServiceStub(channel))
        return self.stubs[index // _STREAMS_PER_CHANNEL]

    async def open(self, index: int, deployment_id: str, opened: asyncio.Event, target: int) -> None:
        stub = self._stub(index)
        await self._opening.acquire()
        released = False
        try:
            call = stub.WatchDeployment(pb.WatchDeploymentRequest(id=deployment_id))
            first = await call.read()
            if first is grpc.aio.EOF:
                raise RuntimeError("stream ended before the current state")
            self._opening.release()
            released = True
            self.opened += 1
            if self.opened >= target:
                opened.set()
            while True:
                item = await call.read()
                if item is grpc.aio.EOF:
                    return
                assert isinstance(item, pb.WatchDeploymentResponse)
                self.arrivals.append((item.event.phase, time.perf_counter()))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.failed += 1
            if not self.first_error:
                self.first_error = f"{type(exc).__name__}: {exc}"[:300]
            if self.opened + self.failed >= target:
                opened.set()
        finally:
            if not released:
                self._opening.release()

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for channel in self.channels:
            await channel.close()


async def run(stack: Stack, plan: Plan, database: str, log: Any) -> dict[str, Any]:
    api_proc, port = stack.api()
    per = plan.watch_per_deployment
    deployments_needed = math.ceil(max(plan.watch_levels) / per)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = deployments_pb2_grpc.DeploymentServiceStub(channel)
    ids: list[str] = []

    async def create(index: int) -> None:
        ids.append((await stub.CreateAppHostingDeployment(create_request(index), timeout=30)).id)

    t0 = time.perf_counter()
    made = await closed_loop(create, concurrency=32, max_requests=deployments_needed, duration=120.0)
    log(
        f"watch on {database}: {len(ids)} deployments to watch created in {time.perf_counter() - t0:.1f} s "
        f"({made.errors} errors)"
    )
    await channel.close()

    nc = await nats.connect(stack.nats.url, name="bench-watch")
    js = nc.jetstream()
    await bus.ensure_streams(js)
    streams = _Streams(port)
    base_rss = api_proc.rss_mb()
    levels: dict[str, Any] = {}
    sequence = 0
    try:
        for level in plan.watch_levels:
            target = min(level, len(ids) * per)
            opened = asyncio.Event()
            t_open = time.perf_counter()
            for index in range(len(streams.tasks), target):
                deployment_id = ids[index // per]
                streams.tasks.append(asyncio.create_task(streams.open(index, deployment_id, opened, target)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(opened.wait(), timeout=plan.watch_open_seconds)
            open_seconds = time.perf_counter() - t_open
            await asyncio.sleep(0.5)
            # The client's own streams leave its collector: with 10,000 of them its young collections
            # took 35-136 ms and delayed every arrival behind them, a pause of this process, not the API's.
            gc.collect()
            gc.freeze()
            rss = api_proc.rss_mb()
            # Events go to the deployments that have streams at this level, round robin, paced.
            watched = math.ceil(target / per)
            sent: dict[str, float] = {}
            expected = 0
            streams.arrivals.clear()
            for k in range(plan.watch_events):
                deployment_id = ids[k % watched]
                sequence += 1
                phase = f"bench-{sequence}"
                event = bus_pb2.StatusEvent(
                    event_id=str(uuid.uuid4()),
                    deployment_id=deployment_id,
                    status=pb.DEPLOYMENT_STATUS_PROVISIONING,
                    phase=phase,
                    message="benchmark event",
                    source="bench",
                )
                event.time.GetCurrentTime()
                expected += min(per, target - (k % watched) * per)
                started = time.perf_counter()
                sent[phase] = started
                await bus.publish(js, bus.event_subject(deployment_id), event.SerializeToString(), event.event_id)
                await asyncio.sleep(max(0.0, 1.0 / plan.watch_rate - (time.perf_counter() - started)))
            # Bounded wait for the stragglers; polling keeps the clients' hot path free of bookkeeping.
            settle = time.perf_counter() + 10.0
            while len(streams.arrivals) < expected and time.perf_counter() < settle:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            latencies = [at - sent[phase] for phase, at in streams.arrivals if phase in sent]
            raw = await ceilings.pub_sub(stack.nats.url, plan.watch_events, rate=plan.watch_rate)
            delivery = summary(latencies)
            entry: dict[str, Any] = {
                "streams": streams.opened,
                "failed_to_open": streams.failed,
                "open_seconds": round(open_seconds, 2),
                "api_rss_mb": rss,
                "api_rss_mb_without_streams": base_rss,
                "kib_per_stream": round((rss - base_rss) * 1024.0 / streams.opened, 1)
                if rss is not None and base_rss is not None and streams.opened
                else None,
                "events": len(sent),
                "deliveries_expected": expected,
                "deliveries": len(latencies),
                "delivery": delivery,
                "nats_pub_sub": raw,
            }
            if streams.first_error:
                entry["first_error"] = streams.first_error
            levels[str(level)] = entry
            log(
                f"watch on {database}: {streams.opened} streams (opened in {open_seconds:.1f} s): delivery p50 "
                f"{delivery['p50_ms']} ms p99 {delivery['p99_ms']} ms ({len(latencies)}/{expected}); "
                f"raw NATS p99 {raw['p99_ms']} ms; {entry['kib_per_stream']} KiB/stream"
            )
    finally:
        await streams.close()
        await nc.close()
        gc.unfreeze()
    top = levels[str(plan.watch_levels[-1])]
    ceiling_kib = await _bare_kib_per_stream(stack, top["streams"], ids, per, plan)
    log(f"watch on {database}: a bare grpc.aio server holds {top['streams']} streams at {ceiling_kib} KiB/stream")
    p99, nats_p99 = top["delivery"]["p99_ms"], top["nats_pub_sub"]["p99_ms"]
    return {
        "database": database,
        "streams": top["streams"],
        "p50_ms": top["delivery"]["p50_ms"],
        "p99_ms": top["delivery"]["p99_ms"],
        "nats_p99_ms": nats_p99,
        # The ceiling is raw NATS at the same pace, measured right after: the API's delay over it, and the ratio.
        "over_nats_p99_ms": round(p99 - nats_p99, 3) if p99 is not None and nats_p99 is not None else None,
        "ratio_to_nats_p99": ratio(p99, nats_p99),
        "kib_per_stream": top["kib_per_stream"],
        # The same streams held by a bare grpc.aio server (bench.echo): what grpc itself costs per stream.
        "grpc_kib_per_stream": ceiling_kib,
        "streams_per_deployment": per,
        "by_streams": levels,
    }


async def _bare_kib_per_stream(stack: Stack, count: int, ids: list[str], per: int, plan: Plan) -> float | None:
    """The memory ceiling: RSS per stream of `count` WatchDeployment streams held open by bench.echo."""
    if not count:
        return None
    response_file = stack.workdir / "watch-echo-response.bin"
    response_file.write_bytes(b"")
    echo_proc = stack.start("echo-watch", python("bench.echo", str(response_file)))
    port = int(echo_proc.wait_for_line(r"echo: listening on [\d.]+:(\d+)").group(1))
    streams = _Streams(port)
    base = echo_proc.rss_mb()
    opened = asyncio.Event()
    try:
        for index in range(count):
            streams.tasks.append(asyncio.create_task(streams.open(index, ids[index // per], opened, count)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(opened.wait(), timeout=plan.watch_open_seconds)
        await asyncio.sleep(0.5)
        rss = echo_proc.rss_mb()
    finally:
        # The stack stops the server with the others (recording its peak memory).
        await streams.close()
    if rss is None or base is None or not streams.opened:
        return None
    return round((rss - base) * 1024.0 / streams.opened, 1)
