"""The pipeline at zero simulated delay: deployments per second from Create to `running`."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import nats
import yaml
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from apphosting import bus
from apphosting.v1 import deployments_pb2 as pb
from apphosting.v1 import deployments_pb2_grpc
from bench.load import closed_loop
from bench.plan import Plan
from bench.procs import Stack, cpu_ms_each, python
from bench.requests import create_request
from bench.stats import summary

if TYPE_CHECKING:
    from apphosting.v1.deployments_pb2_grpc import DeploymentServiceAsyncStub

# Room for every deployment of the run, so placement never refuses and only speed is measured.
_HUGE = {"cpu": 1_000_000, "memory_mb": 1_000_000_000, "storage_gb": 1_000_000_000, "vclusters": 1_000_000}
LOCATION_IDS = ("bench-a", "bench-b", "bench-c", "bench-d")
# Issue 12's goals: deployments per second from Create to `running`, and the p99 of create→running
# when Creates are offered at OFFERED_PER_SECOND whatever the answers (an open loop).
GOAL_PER_SECOND = 200.0
OFFERED_PER_SECOND = 100.0
GOAL_OFFERED_P99_MS = 1000.0


def write_locations(path: Path) -> Path:
    locations = [
        {
            "id": location_id,
            "provider": "bench",
            "region": f"eu-bench-{index}",
            "geographic_region": "eu",
            "capacity": _HUGE,
        }
        for index, location_id in enumerate(LOCATION_IDS)
    ]
    path.write_text(yaml.safe_dump({"locations": locations}))
    return path


async def _ready(js: JetStreamContext, stream: str, durable: str, pulls: int, deadline: float) -> None:
    """Waits until `pulls` fetches wait on the consumer: its workers are up and asking for work."""
    while time.monotonic() < deadline:
        try:
            info = await js.consumer_info(stream, durable)
            if (info.num_waiting or 0) >= pulls:
                return
        except NotFoundError:
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError(f"consumer {stream}/{durable} not ready with {pulls} waiting pulls")


async def start_processes(stack: Stack, provisioners: int, *, shared_state: bool = False) -> int:
    """Starts the API, the scheduler and `provisioners` simulated provisioners at zero delay; returns the API's port.

    With shared_state the provisioners keep their simulated clusters in one SQLite file, so a later job (an
    update) finds what another provisioner created; creates alone need none. Returns once every consumer has
    its workers waiting for work, so the first request is not spent on start-up.
    """
    locations = write_locations(stack.workdir / "locations.yaml")
    _, port = stack.api(locations)
    common = ["--nats-url", stack.nats.url, "--locations", str(locations), "--log-level", "WARNING"]
    stack.start(
        "scheduler",
        python("apphosting_cli", "scheduler", "--database-url", stack.database_url, *common),
        profile=True,
    )
    state = ["--simulate-state", str(stack.workdir / "simulated.db")] if shared_state else []
    for index in range(provisioners):
        stack.start(
            f"provisioner-{index}",
            python("apphosting_cli", "provisioner", "--simulate-delay", "0", *state, *common),
            profile=True,
        )
    nc = await nats.connect(stack.nats.url, name="bench-ready")
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + 60
        await _ready(js, bus.REQUESTS_STREAM, bus.SCHEDULER_CONSUMER, 1, deadline)
        for location_id in LOCATION_IDS:
            await _ready(js, bus.JOBS_STREAM, bus.provisioner_consumer(location_id), provisioners, deadline)
        await _ready(js, bus.EVENTS_STREAM, bus.API_EVENTS_CONSUMER, 1, deadline)
    finally:
        await nc.close()
    return port


class _Arrivals:
    """The API's announcements of what it applied: when each deployment was seen `running`, or failed."""

    def __init__(self) -> None:
        self.created: dict[str, float] = {}
        self.running: dict[str, float] = {}
        self.failed: dict[str, str] = {}
        self.expected: int | None = None
        self.done = asyncio.Event()

    async def on_change(self, msg: Msg) -> None:
        # The API announces every change it applied; the record is `running` when this arrives.
        deployment = pb.WatchDeploymentsResponse.FromString(msg.data).deployment
        if deployment.status == pb.DEPLOYMENT_STATUS_RUNNING and deployment.id not in self.running:
            self.running[deployment.id] = time.perf_counter()
        elif deployment.status in (pb.DEPLOYMENT_STATUS_FAILED, pb.DEPLOYMENT_STATUS_ERROR):
            self.failed[deployment.id] = deployment.error_message
        self.check()

    def check(self) -> None:
        if self.expected is not None and len(self.running) + len(self.failed) >= self.expected:
            self.done.set()

    def all_created(self) -> None:
        self.expected = len(self.created)
        self.check()

    async def wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.done.wait(), timeout=max(1.0, seconds))

    def reached(self) -> list[float]:
        return [self.running[i] - self.created[i] for i in self.created if i in self.running]


@contextlib.asynccontextmanager
async def _watching(stack: Stack, port: int) -> AsyncIterator[tuple[_Arrivals, DeploymentServiceAsyncStub]]:
    arrivals = _Arrivals()
    nc = await nats.connect(stack.nats.url, name="bench-pipeline")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        await nc.subscribe(bus.CHANGES_SUBJECTS, cb=arrivals.on_change)
        await nc.flush()
        stub: DeploymentServiceAsyncStub = deployments_pb2_grpc.DeploymentServiceStub(channel)
        yield arrivals, stub
    finally:
        await channel.close()
        await nc.close()


async def run_one(stack: Stack, plan: Plan, provisioners: int, database: str, log: Any) -> dict[str, Any]:
    port = await start_processes(stack, provisioners)
    async with _watching(stack, port) as (arrivals, stub):

        async def call(index: int) -> None:
            t0 = time.perf_counter()
            deployment = await stub.CreateAppHostingDeployment(create_request(index), timeout=10)
            arrivals.created[deployment.id] = t0

        cpu_before = stack.cpu_seconds()
        began = time.perf_counter()
        load = await closed_loop(
            call,
            concurrency=plan.pipeline_concurrency,
            max_requests=plan.pipeline_deployments,
            duration=plan.pipeline_seconds / 2,
        )
        arrivals.all_created()
        await arrivals.wait(plan.pipeline_seconds - (time.perf_counter() - began))
        cpu = cpu_ms_each(cpu_before, stack.cpu_seconds(), len(arrivals.running))
        peaks = stack.peaks()
    reached = arrivals.reached()
    last = max((arrivals.running[i] for i in arrivals.created if i in arrivals.running), default=began)
    per_second = len(reached) / (last - began) if reached else 0.0
    result: dict[str, Any] = {
        "database": database,
        "provisioners": provisioners,
        "created": len(arrivals.created),
        "create_rps": round(load.rps, 1),
        "running": len(reached),
        "failed": len(arrivals.failed),
        "per_second": round(per_second, 1),
        "ratio_to_goal": round(per_second / GOAL_PER_SECOND, 3),
        "seconds": round(last - began, 2),
        "create_to_running": summary(reached),
        # What the stage cost each process per deployment brought to running (the database server not
        # counted): the machine's cores divided by the total is the rate it allows at full use.
        "cpu_ms_per_deployment": cpu,
        "peak_rss_mb": peaks,
    }
    if arrivals.failed:
        result["first_failure"] = next(iter(arrivals.failed.values()))[:300]
    log(
        f"pipeline on {database} with {provisioners} provisioner(s): {len(reached)}/{len(arrivals.created)} "
        f"running, {per_second:.1f}/s, create→running p50 {result['create_to_running']['p50_ms']} ms "
        f"p99 {result['create_to_running']['p99_ms']} ms; CPU ms per deployment "
        + ", ".join(f"{kind} {ms}" for kind, ms in cpu.items())
    )
    return result


async def run_offered(stack: Stack, plan: Plan, provisioners: int, database: str, log: Any) -> dict[str, Any]:
    """Creates offered at OFFERED_PER_SECOND for plan.pipeline_offered_seconds, each sent at its own
    moment whether or not earlier ones were answered (an open loop), so a slow pipeline shows as
    growing latency rather than as a slower sender. Latency runs from a Create's scheduled moment to
    its `running`; a deployment not running when the run ends counts as the whole wait (so the p99
    is then a lower bound, said by `complete`)."""
    port = await start_processes(stack, provisioners)
    count = round(OFFERED_PER_SECOND * plan.pipeline_offered_seconds)
    errors: list[str] = []
    async with _watching(stack, port) as (arrivals, stub):
        began = time.perf_counter()

        async def send(index: int) -> None:
            due = began + index / OFFERED_PER_SECOND
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            try:
                deployment = await stub.CreateAppHostingDeployment(create_request(index), timeout=30)
            except grpc.aio.AioRpcError as failure:
                errors.append(f"{failure.code().name}: {failure.details()}")
                return
            arrivals.created[deployment.id] = due

        await asyncio.gather(*(send(index) for index in range(count)))
        arrivals.all_created()
        waited = plan.pipeline_offered_seconds + plan.pipeline_seconds
        await arrivals.wait(waited - (time.perf_counter() - began))
        ended = time.perf_counter()
    reached = arrivals.reached()
    unfinished = [ended - arrivals.created[i] for i in arrivals.created if i not in arrivals.running]
    latency = summary(reached + unfinished)
    result: dict[str, Any] = {
        "database": database,
        "provisioners": provisioners,
        "offered_per_second": OFFERED_PER_SECOND,
        "offered": count,
        "created": len(arrivals.created),
        "create_errors": len(errors),
        "running": len(reached),
        "failed": len(arrivals.failed),
        "complete": not unfinished and not errors,
        "create_to_running": latency,
    }
    if errors:
        result["first_error"] = errors[0][:300]
    log(
        f"pipeline on {database} offered {OFFERED_PER_SECOND:g}/s with {provisioners} provisioner(s): "
        f"{len(reached)}/{count} running, create→running p50 {latency['p50_ms']} ms p99 {latency['p99_ms']} ms"
    )
    return result
