"""The pipeline at zero simulated delay: deployments per second from Create to `running`."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

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
from bench.procs import Stack, python
from bench.requests import create_request
from bench.stats import summary

# Room for every deployment of the run, so placement never refuses and only speed is measured.
_HUGE = {"cpu": 1_000_000, "memory_mb": 1_000_000_000, "storage_gb": 1_000_000_000, "vclusters": 1_000_000}
LOCATION_IDS = ("bench-a", "bench-b", "bench-c", "bench-d")
# Issue 12's goal: deployments per second from Create to `running`.
GOAL_PER_SECOND = 200.0


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


async def run_one(stack: Stack, plan: Plan, provisioners: int, database: str, log: Any) -> dict[str, Any]:
    port = await start_processes(stack, provisioners)
    nc = await nats.connect(stack.nats.url, name="bench-pipeline")

    created: dict[str, float] = {}
    running: dict[str, float] = {}
    failed: dict[str, str] = {}
    done = asyncio.Event()
    created_all = False

    async def on_change(msg: Msg) -> None:
        # The API announces every change it applied; the record is `running` when this arrives.
        change = pb.WatchDeploymentsResponse.FromString(msg.data)
        deployment = change.deployment
        if deployment.status == pb.DEPLOYMENT_STATUS_RUNNING and deployment.id not in running:
            running[deployment.id] = time.perf_counter()
        elif deployment.status in (pb.DEPLOYMENT_STATUS_FAILED, pb.DEPLOYMENT_STATUS_ERROR):
            failed[deployment.id] = deployment.error_message
        if created_all and len(running) + len(failed) >= len(created):
            done.set()

    await nc.subscribe(bus.CHANGES_SUBJECTS, cb=on_change)
    await nc.flush()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = deployments_pb2_grpc.DeploymentServiceStub(channel)

    async def call(index: int) -> None:
        t0 = time.perf_counter()
        deployment = await stub.CreateAppHostingDeployment(create_request(index), timeout=10)
        created[deployment.id] = t0

    began = time.perf_counter()
    try:
        load = await closed_loop(
            call,
            concurrency=plan.pipeline_concurrency,
            max_requests=plan.pipeline_deployments,
            duration=plan.pipeline_seconds / 2,
        )
        created_all = True
        if len(running) + len(failed) >= len(created):
            done.set()
        remaining = max(1.0, plan.pipeline_seconds - (time.perf_counter() - began))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), timeout=remaining)
        peaks = stack.peaks()
    finally:
        await channel.close()
        await nc.close()
    reached = [running[i] - created[i] for i in created if i in running]
    last = max((running[i] for i in created if i in running), default=began)
    per_second = len(reached) / (last - began) if reached else 0.0
    result: dict[str, Any] = {
        "database": database,
        "provisioners": provisioners,
        "created": len(created),
        "create_rps": round(load.rps, 1),
        "running": len(reached),
        "failed": len(failed),
        "per_second": round(per_second, 1),
        "ratio_to_goal": round(per_second / GOAL_PER_SECOND, 3),
        "seconds": round(last - began, 2),
        "create_to_running": summary(reached),
        "peak_rss_mb": peaks,
    }
    if failed:
        result["first_failure"] = next(iter(failed.values()))[:300]
    log(
        f"pipeline on {database} with {provisioners} provisioner(s): {len(reached)}/{len(created)} running, "
        f"{per_second:.1f}/s, create→running p50 {result['create_to_running']['p50_ms']} ms "
        f"p99 {result['create_to_running']['p99_ms']} ms"
    )
    return result
