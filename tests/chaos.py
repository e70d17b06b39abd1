"""The chaos run: deployments created while random processes of the platform are SIGKILLed.

    python -m tests.chaos --deployments 200 --kills 20

starts nats-server, two API replicas, a scheduler and two provisioners as real processes, creates
the deployments through both APIs while it kills and restarts a random one of them (nats-server
included) at random moments, holds resumable watches on some deployments, then waits until every
accepted deployment has settled and prints one line:

    accepted=… running=… failed=… error=… lost=0 duplicated=0 watch_gaps=0 kills=…

lost counts accepted deployments that did not reach the state they would have reached without
the kills (running, or failed for those built to fail); duplicated counts objects the simulated
clusters created more than once; watch_gaps counts watches that skipped or repeated a revision.
It exits non-zero when any of the three is not 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from apphosting.v1 import deployments_pb2 as pb
from apphosting.v1 import deployments_pb2_grpc
from provisioner.simulated import SimulatedState
from tests.support.cluster import Cluster

SETTLED = {pb.DEPLOYMENT_STATUS_RUNNING, pb.DEPLOYMENT_STATUS_FAILED, pb.DEPLOYMENT_STATUS_ERROR}
# gRPC codes after which the same request (same request_id) is simply sent again.
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}


@dataclass
class ChaosResult:
    accepted: int = 0
    running: int = 0
    failed: int = 0
    error: int = 0
    lost: int = 0
    duplicated: int = 0
    watch_gaps: int = 0
    kills: int = 0
    seconds: float = 0.0
    details: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and self.watch_gaps == 0

    def line(self) -> str:
        return (
            f"accepted={self.accepted} running={self.running} failed={self.failed} error={self.error} "
            f"lost={self.lost} duplicated={self.duplicated} watch_gaps={self.watch_gaps} kills={self.kills} "
            f"seconds={self.seconds:.0f}"
        )


class _Client:
    """Stubs for every API replica; a call goes to one and moves to the next when that one is down."""

    def __init__(self, addresses: list[str]) -> None:
        self.channels = [grpc.aio.insecure_channel(address) for address in addresses]
        self.stubs = [deployments_pb2_grpc.DeploymentServiceStub(c) for c in self.channels]

    def stub(self, n: int) -> deployments_pb2_grpc.DeploymentServiceAsyncStub:
        return self.stubs[n % len(self.stubs)]

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


async def _create(client: _Client, n: int, fails: bool, deadline: float) -> tuple[pb.Deployment, bool] | None:
    request = pb.CreateAppHostingDeploymentRequest(
        geographic_region=("eu", "us", "asia")[n % 3],
        deployment_name=f"chaos-{n}",
        app_type="web_app",
        docker_image="ghcr.io/acme/fail-permanent:1" if fails else "ghcr.io/acme/web:1.0.0",
        cpu_request=0.1,
        memory_request_mb=128,
        request_id=str(uuid.uuid4()),
    )
    attempt = n
    while time.monotonic() < deadline:
        try:
            created = await client.stub(attempt).CreateAppHostingDeployment(request, timeout=10)
            return created, fails
        except grpc.aio.AioRpcError as error:
            if error.code() not in _RETRYABLE:
                raise
            # The answer may have been lost after the commit: the same request_id replays it.
            attempt += 1
            await asyncio.sleep(0.2)
    return None


async def _watch(client: _Client, deployment_id: str, revisions: list[int], deadline: float) -> None:
    """Follows one deployment across replica deaths, resuming from the last revision it saw."""
    last = 0
    attempt = 0
    while time.monotonic() < deadline:
        stream = client.stub(attempt).WatchDeployment(pb.WatchDeploymentRequest(id=deployment_id, since_revision=last))
        try:
            async for item in stream:
                revision = item.event.revision if item.HasField("event") else item.deployment.revision
                revisions.append(revision)
                last = revision
                if item.deployment.status in SETTLED and item.HasField("event"):
                    return
        except grpc.aio.AioRpcError as error:
            if error.code() not in _RETRYABLE:
                raise
        finally:
            stream.cancel()
        attempt += 1
        await asyncio.sleep(0.2)


async def _kill_loop(cluster: Cluster, kills: int, span: float, rng: random.Random, result: ChaosResult) -> None:
    targets = [*cluster.processes, "nats"]
    for _ in range(kills):
        await asyncio.sleep(rng.uniform(0.3, 2 * span / kills))
        target = rng.choice(targets)
        if target == "nats":
            assert cluster.nats.process is not None
            cluster.nats.process.kill()
            cluster.nats.process.wait()
            await asyncio.sleep(rng.uniform(0.1, 1.0))
            await asyncio.to_thread(cluster.nats.start)
        else:
            process = cluster.processes[target]
            await asyncio.to_thread(process.kill)
            await asyncio.sleep(rng.uniform(0.1, 1.0))
            await asyncio.to_thread(process.start)
        result.kills += 1
        result.details.append(f"killed {target}")


async def run_chaos(
    workdir: Path,
    *,
    deployments: int = 200,
    kills: int = 20,
    seconds: float = 900,
    seed: int = 1,
    database_url: str | None = None,
    watches: int = 10,
) -> ChaosResult:
    rng = random.Random(seed)
    result = ChaosResult()
    started = time.monotonic()
    deadline = started + seconds
    cluster = Cluster(workdir, database_url or f"sqlite:///{workdir / 'apphosting.db'}")
    await asyncio.to_thread(cluster.nats.start)
    client: _Client | None = None
    try:
        for name in ("api-1", "api-2"):
            await asyncio.to_thread(cluster.add_api, name)
        await asyncio.to_thread(cluster.add_scheduler, "scheduler")
        for name in ("provisioner-1", "provisioner-2"):
            await asyncio.to_thread(cluster.add_provisioner, name)
        client = _Client(cluster.api_addresses())
        # Creates are spread over the time the kills take, so both happen together.
        span = max(5.0, deployments * 0.05)
        killer = asyncio.create_task(_kill_loop(cluster, kills, span, rng, result))
        created: list[tuple[pb.Deployment, bool]] = []
        watchers: list[tuple[str, list[int], asyncio.Task[None]]] = []

        async def create(n: int) -> None:
            await asyncio.sleep(span * n / deployments)
            answer = await _create(client, n, fails=n % 10 == 0, deadline=deadline)
            if answer is None:
                return
            created.append(answer)
            if len(watchers) < watches:
                revisions: list[int] = []
                task = asyncio.create_task(_watch(client, answer[0].id, revisions, deadline))
                watchers.append((answer[0].id, revisions, task))

        await asyncio.gather(*(create(n) for n in range(deployments)))
        await killer
        result.accepted = len(created)
        final = await _settle(client, [d.id for d, _ in created], deadline)
        for deployment, fails in created:
            status = final.get(deployment.id)
            expected = pb.DEPLOYMENT_STATUS_FAILED if fails else pb.DEPLOYMENT_STATUS_RUNNING
            if status == pb.DEPLOYMENT_STATUS_RUNNING:
                result.running += 1
            elif status == pb.DEPLOYMENT_STATUS_FAILED:
                result.failed += 1
            elif status == pb.DEPLOYMENT_STATUS_ERROR:
                result.error += 1
            if status != expected:
                result.lost += 1
                result.details.append(f"{deployment.id} ({deployment.name}) ended {status}, expected {expected}")
        for deployment_id, revisions, task in watchers:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(task, timeout=max(1.0, deadline - time.monotonic()))
            contiguous = bool(revisions) and revisions == list(range(revisions[0], revisions[0] + len(revisions)))
            if not contiguous:
                result.watch_gaps += 1
                result.details.append(f"watch of {deployment_id} saw revisions {revisions}")
        creations = SimulatedState(cluster.state_file).creations()
        result.duplicated = sum(1 for count in creations.values() if count > 1)
        result.details.extend(f"{name} created {count} times" for name, count in creations.items() if count > 1)
    finally:
        if client is not None:
            await client.close()
        await asyncio.to_thread(cluster.close)
        result.seconds = time.monotonic() - started
    return result


async def _settle(client: _Client, ids: list[str], deadline: float) -> dict[str, int]:
    """The status of each deployment once all have settled, or as they stand at the deadline."""
    statuses: dict[str, int] = {}
    attempt = 0
    while True:
        for deployment_id in ids:
            if statuses.get(deployment_id) in SETTLED:
                continue
            try:
                got = await client.stub(attempt).GetDeployment(pb.GetDeploymentRequest(id=deployment_id), timeout=5)
                statuses[deployment_id] = got.status
            except grpc.aio.AioRpcError:
                attempt += 1
        if all(statuses.get(i) in SETTLED for i in ids) or time.monotonic() > deadline:
            return statuses
        await asyncio.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--deployments", type=int, default=200)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=900, help="give up waiting after this long")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--database-url", default=None, help="default: a SQLite file in the work folder")
    parser.add_argument("--workdir", default=None, help="keep logs and data here (default: a temp folder)")
    parser.add_argument("--verbose", action="store_true", help="print what was killed and every problem")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="apphosting-chaos-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        result = asyncio.run(
            run_chaos(
                workdir,
                deployments=args.deployments,
                kills=args.kills,
                seconds=args.seconds,
                seed=args.seed,
                database_url=args.database_url,
            )
        )
    if args.verbose or not result.ok:
        print("\n".join(result.details))
    print(result.line())
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
