"""Image updates of running deployments: updates per second from UpdateDeployment to the new release healthy."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import field_mask_pb2

from apphosting.v1 import deployments_pb2 as pb
from apphosting.v1 import deployments_pb2_grpc
from bench.load import closed_loop
from bench.pipeline import start_processes
from bench.plan import Plan
from bench.procs import Stack, cpu_ms_each
from bench.requests import EXAMPLE, create_request
from bench.stats import summary

if TYPE_CHECKING:
    from apphosting.v1.deployments_pb2_grpc import DeploymentServiceAsyncStub

GOAL_PER_SECOND = 200.0
_IMAGE = str(EXAMPLE["docker_image"]).rsplit(":", 1)[0]
_MASK = field_mask_pb2.FieldMask(paths=["docker_image"])


@dataclass
class _Progress:
    """What the watch stream has shown of each deployment, and when each one reached the state waited for."""

    ready: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    # Release each update made, and when it was asked for.
    target: dict[str, int] = field(default_factory=dict)
    asked: dict[str, float] = field(default_factory=dict)
    healthy: dict[str, float] = field(default_factory=dict)
    rolled_back: dict[str, str] = field(default_factory=dict)
    last: dict[str, tuple[pb.Deployment, float]] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def see(self, deployment: pb.Deployment, at: float) -> None:
        self.last[deployment.id] = (deployment, at)
        self._judge(deployment, at)
        self.changed.set()

    def aim(self, deployment_id: str, release: int, asked: float) -> None:
        """Records the release an update made; judges the state already seen, which may be past it."""
        self.target[deployment_id] = release
        self.asked[deployment_id] = asked
        seen = self.last.get(deployment_id)
        if seen is not None:
            self._judge(*seen)

    def _judge(self, deployment: pb.Deployment, at: float) -> None:
        key = deployment.id
        settled = not deployment.reconciling and deployment.healthy_release == deployment.release
        if deployment.status in (pb.DEPLOYMENT_STATUS_FAILED, pb.DEPLOYMENT_STATUS_ERROR):
            self.failed.setdefault(key, deployment.error_message or pb.DeploymentStatus.Name(deployment.status))
        elif deployment.status == pb.DEPLOYMENT_STATUS_RUNNING and settled and key not in self.ready:
            self.ready[key] = at
        target = self.target.get(key)
        if target is None or key in self.healthy or key in self.rolled_back:
            return
        if deployment.release > target:
            # Only an automatic rollback makes a newer release here: the update did not get healthy.
            self.rolled_back[key] = deployment.error_message or f"release {deployment.release} after {target}"
        elif deployment.healthy_release >= target and not deployment.reconciling:
            self.healthy[key] = at


async def _watch(
    stub: DeploymentServiceAsyncStub, progress: _Progress, opened: asyncio.Event, drops: list[str]
) -> None:
    """Follows WatchDeployments (`opened` once a change arrived).

    When the stream ends (the API ends a reader that falls too far behind), reads every record back and watches again.
    """
    while True:
        call = stub.WatchDeployments(pb.WatchDeploymentsRequest())
        try:
            if drops:
                # Changes may have been missed while the stream was down: the records say where each one is.
                for deployment_id in list(progress.last):
                    got = await stub.GetDeployment(pb.GetDeploymentRequest(id=deployment_id), timeout=10)
                    progress.see(got, time.perf_counter())
            async for change in call:
                opened.set()
                progress.see(change.deployment, time.perf_counter())
            drops.append("stream ended")
        except grpc.aio.AioRpcError as exc:
            drops.append(f"{exc.code().name}: {exc.details()}")
        finally:
            call.cancel()


async def _until(progress: _Progress, done: Callable[[], bool], deadline: float) -> bool:
    while not done():
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            return False
        progress.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(progress.changed.wait(), timeout=min(remaining, 1.0))
    return True


async def run_one(stack: Stack, plan: Plan, database: str, log: Any) -> dict[str, Any]:
    port = await start_processes(stack, plan.update_provisioners, shared_state=True)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = deployments_pb2_grpc.DeploymentServiceStub(channel)
    progress = _Progress()
    drops: list[str] = []
    opened = asyncio.Event()
    watcher = asyncio.create_task(_watch(stub, progress, opened, drops))
    ids: list[str] = []
    try:
        # The stream sends nothing until a change: a first deployment shows that it is open.
        for attempt in range(6):
            probe = await stub.CreateAppHostingDeployment(create_request(plan.update_deployments + attempt), timeout=30)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(opened.wait(), timeout=10)
            if opened.is_set():
                break
        else:
            raise RuntimeError(f"WatchDeployments showed no change in a minute (stream: {drops or 'open'})")
        await _until(progress, lambda: probe.id in progress.ready, time.perf_counter() + 60)

        async def create(index: int) -> None:
            deployment = await stub.CreateAppHostingDeployment(create_request(index), timeout=30)
            ids.append(deployment.id)
            progress.last.setdefault(deployment.id, (deployment, time.perf_counter()))

        created = await closed_loop(
            create,
            concurrency=plan.update_concurrency,
            max_requests=plan.update_deployments,
            duration=plan.update_seconds,
        )
        await _until(
            progress,
            lambda: all(i in progress.ready or i in progress.failed for i in ids),
            # Creates still converging would share the API with the updates and slow them.
            time.perf_counter() + 2 * plan.update_seconds,
        )
        running = [deployment_id for deployment_id in ids if deployment_id in progress.ready]
        log(f"update on {database}: {len(running)}/{len(ids)} deployments running and healthy; updating them")

        async def update(index: int) -> None:
            deployment_id = running[index]
            request = pb.UpdateDeploymentRequest(
                deployment=pb.Deployment(id=deployment_id, docker_image=f"{_IMAGE}:1.5.{index}"),
                update_mask=_MASK,
                reason="bench: new image",
            )
            asked = time.perf_counter()
            answer = await stub.UpdateDeployment(request, timeout=30)
            progress.aim(deployment_id, answer.release, asked)

        cpu_before = stack.cpu_seconds()
        began = time.perf_counter()
        updates = await closed_loop(
            update,
            concurrency=plan.update_concurrency,
            max_requests=len(running),
            duration=plan.update_seconds,
        )
        settled = await _until(
            progress,
            lambda: len(progress.healthy) + len(progress.rolled_back) >= len(progress.target),
            began + 2 * plan.update_seconds,
        )
        cpu = cpu_ms_each(cpu_before, stack.cpu_seconds(), len(progress.healthy))
        peaks = stack.peaks()
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await channel.close()

    latencies = [progress.healthy[i] - progress.asked[i] for i in progress.healthy]
    last = max(progress.healthy.values(), default=began)
    per_second = len(latencies) / (last - began) if latencies else 0.0
    result: dict[str, Any] = {
        "database": database,
        "provisioners": plan.update_provisioners,
        "concurrency": plan.update_concurrency,
        "deployments": len(ids),
        "create_errors": created.errors,
        "running": len(running),
        "updates": len(progress.target),
        "update_errors": updates.errors,
        "update_rps": round(updates.rps, 1),
        "healthy": len(latencies),
        "rolled_back": len(progress.rolled_back),
        "all_healthy": settled and len(latencies) == len(running) and not updates.errors,
        "per_second": round(per_second, 1),
        "goal_per_second": GOAL_PER_SECOND,
        "ratio_to_goal": round(per_second / GOAL_PER_SECOND, 3),
        "seconds": round(last - began, 2),
        "update_to_healthy": summary(latencies),
        "update_call": {key: value for key, value in updates.as_dict().items() if key != "concurrency"},
        "watch_reopened": len(drops),
        # What the updates cost each process per update that got healthy (the database server not counted).
        "cpu_ms_per_update": cpu,
        "peak_rss_mb": peaks,
    }
    for name, found in (
        ("first_create_error", created.first_error),
        ("first_update_error", updates.first_error),
        ("first_failure", next(iter(progress.failed.values()), "")),
        ("first_rollback", next(iter(progress.rolled_back.values()), "")),
        ("first_watch_drop", drops[0] if drops else ""),
    ):
        if found:
            result[name] = found[:300]
    log(
        f"update on {database}: {len(latencies)}/{len(running)} healthy, {per_second:.1f}/s "
        f"(goal {GOAL_PER_SECOND:.0f}/s, {result['ratio_to_goal']}x), update→healthy "
        f"p50 {result['update_to_healthy']['p50_ms']} ms p99 {result['update_to_healthy']['p99_ms']} ms, "
        f"Update calls {updates.rps:.0f}/s; CPU ms per update " + ", ".join(f"{kind} {ms}" for kind, ms in cpu.items())
    )
    return result
