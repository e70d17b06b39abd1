"""The chaos run: deployments created and operated on while random processes of the platform are SIGKILLed.

    python -m tests.chaos --deployments 200 --operations 300 --kills 20

starts nats-server (with --nats-cluster 3, a JetStream cluster of three nodes whose streams have three
replicas), two API replicas, a scheduler and two provisioners as real processes, creates
the deployments through both APIs and issues random day-2 operations on them (update, scale, stop,
start, rollback, promote) while it kills and restarts a random one of the processes (nats-server, or
each NATS node, included) at random moments, holds resumable watches on some deployments, then waits until every
accepted deployment is at rest and prints one line:

    accepted=… running=… stopped=… failed=… error=… lost=0 duplicated=0 mismatched=0 watch_gaps=0 …

lost counts accepted deployments (promoted copies included) that are missing or never came to rest,
or that no operation touched and did not reach the state they would have reached without the
kills; duplicated counts objects the simulated clusters created more than once; mismatched counts
deployments whose record is not at the last release an accepted operation made (or a later
automatic rollback), is not running or stopped as the last accepted stop or start asked, or whose
app in the simulated clusters does not run the record's release and spec (replicas 0 and its
vCluster asleep when stopped); unobserved counts apps whose release the simulated clusters did not
record (a worker killed between creating the app and writing what it runs), which prove nothing
either way and fail nothing; watch_gaps counts watches that skipped or repeated a revision.
An operation's call is retried a few times when no answer came; refusals by design (ABORTED,
FAILED_PRECONDITION, UNAVAILABLE) are counted, any other error is an operation failure. It exits
non-zero when lost, duplicated, mismatched, watch_gaps or the operation failures are not 0.
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
from tests.support import chaos_ops
from tests.support.chaos_ops import Operator, OpStats, Tracked
from tests.support.cluster import Cluster, Process

SETTLED = {pb.DEPLOYMENT_STATUS_RUNNING, pb.DEPLOYMENT_STATUS_FAILED, pb.DEPLOYMENT_STATUS_ERROR}
# gRPC codes after which the same request (same request_id) is simply sent again.
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}


@dataclass
class ChaosResult:
    accepted: int = 0
    copies: int = 0
    running: int = 0
    stopped: int = 0
    failed: int = 0
    error: int = 0
    lost: int = 0
    duplicated: int = 0
    mismatched: int = 0
    unobserved: int = 0
    watch_gaps: int = 0
    kills: int = 0
    seconds: float = 0.0
    operations: OpStats = field(default_factory=OpStats)
    details: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.lost == 0
            and self.duplicated == 0
            and self.mismatched == 0
            and self.watch_gaps == 0
            and not self.operations.failures
        )

    def line(self) -> str:
        return (
            f"accepted={self.accepted} copies={self.copies} running={self.running} stopped={self.stopped} "
            f"failed={self.failed} error={self.error} lost={self.lost} duplicated={self.duplicated} "
            f"mismatched={self.mismatched} unobserved={self.unobserved} watch_gaps={self.watch_gaps} "
            f"{self.operations.line()} kills={self.kills} seconds={self.seconds:.0f}"
        )


class _ChaosCluster(Cluster):
    """The cluster with a short rollout timeout, so a release that never gets healthy is rolled back
    within the run."""

    rollout_timeout: float = 5.0

    def _add(self, name: str, args: list[str], port: int | None = None) -> Process:
        if args[0] == "api":
            args = [*args, "--rollout-timeout", str(self.rollout_timeout)]
        return super()._add(name, args, port)


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
    nodes = cluster.nats_cluster
    targets = [*cluster.processes, *(["nats"] if nodes is None else [f"nats-{nodes.name_of(n)}" for n in nodes.nodes])]
    for _ in range(kills):
        await asyncio.sleep(rng.uniform(0.3, 2 * span / kills))
        target = rng.choice(targets)
        if nodes is not None and target.startswith("nats-"):
            node = nodes.node(target.removeprefix("nats-"))
            await asyncio.to_thread(nodes.kill, node)
            await asyncio.sleep(rng.uniform(0.1, 1.0))
            await asyncio.to_thread(nodes.restart, node)
        elif target == "nats":
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
    operations: int = 300,
    kills: int = 20,
    seconds: float = 900,
    seed: int = 1,
    database_url: str | None = None,
    watches: int = 10,
    nats_nodes: int = 1,
) -> ChaosResult:
    rng = random.Random(seed)
    result = ChaosResult()
    started = time.monotonic()
    deadline = started + seconds
    cluster = _ChaosCluster(workdir, database_url or f"sqlite:///{workdir / 'apphosting.db'}", nats_nodes=nats_nodes)
    await asyncio.to_thread(cluster.nats.start if cluster.nats_cluster is None else cluster.nats_cluster.start)
    client: _Client | None = None
    try:
        for name in ("api-1", "api-2"):
            await asyncio.to_thread(cluster.add_api, name)
        await asyncio.to_thread(cluster.add_scheduler, "scheduler")
        for name in ("provisioner-1", "provisioner-2"):
            await asyncio.to_thread(cluster.add_provisioner, name)
        client = _Client(cluster.api_addresses())
        # Creates are spread over a span, operations over a longer one that starts a little later (so
        # most meet a deployment that runs), and the kills over both, so all happen together.
        span = max(5.0, deployments * 0.05)
        operations_after = span * 0.5
        operations_span = max(2 * span, operations * 0.2)
        killer = asyncio.create_task(_kill_loop(cluster, kills, operations_after + operations_span, rng, result))
        created: list[tuple[pb.Deployment, bool]] = []
        tracked: list[Tracked] = []
        watchers: list[tuple[str, list[int], asyncio.Task[None]]] = []
        operator = Operator(client, tracked, random.Random(seed + 1), deadline)

        async def create(n: int) -> None:
            await asyncio.sleep(span * n / deployments)
            answer = await _create(client, n, fails=n % 10 == 0, deadline=deadline)
            if answer is None:
                return
            created.append(answer)
            tracked.append(Tracked(answer[0].id, answer[0].name, fails=answer[1]))
            if len(watchers) < watches:
                revisions: list[int] = []
                task = asyncio.create_task(_watch(client, answer[0].id, revisions, deadline))
                watchers.append((answer[0].id, revisions, task))

        await asyncio.gather(
            *(create(n) for n in range(deployments)),
            operator.run(operations, operations_span, operations_after),
        )
        await killer
        result.accepted = len(created)
        result.operations = operator.stats
        await _add_lost_copies(client, tracked, deadline)
        result.copies = len(tracked) - len(created)
        await _check(client, cluster, tracked, deadline, result)
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
        result.details.extend(f"operation failure: {failure}" for failure in result.operations.failures)
    finally:
        if client is not None:
            await client.close()
        await asyncio.to_thread(cluster.close)
        result.seconds = time.monotonic() - started
    return result


async def _add_lost_copies(client: _Client, tracked: list[Tracked], deadline: float) -> None:
    """Tracks the copies of promotes whose answer was lost: by name, as each copy's name is unique."""
    uncertain = {op.copy_name for t in tracked for op in t.ops if op.kind == "promote" and op.outcome == "uncertain"}
    known = {t.name for t in tracked}
    found = await chaos_ops.find_by_name(client, uncertain - known, deadline)
    for t in list(tracked):
        for op in t.ops:
            if op.kind == "promote" and op.outcome == "uncertain":
                copy = found.get(op.copy_name)
                op.outcome = "accepted" if copy is not None or op.copy_name in known else "refused"
                if copy is not None:
                    tracked.append(Tracked(copy.id, copy.name, fails=False))


async def _check(
    client: _Client, cluster: Cluster, tracked: list[Tracked], deadline: float, result: ChaosResult
) -> None:
    """Waits until every deployment is at rest, then compares each with what its accepted operations asked for."""
    final = await chaos_ops.wait_at_rest(client, [t.id for t in tracked], deadline)
    state = SimulatedState(cluster.state_file)
    counts = {
        pb.DEPLOYMENT_STATUS_RUNNING: "running",
        pb.DEPLOYMENT_STATUS_STOPPED: "stopped",
        pb.DEPLOYMENT_STATUS_FAILED: "failed",
        pb.DEPLOYMENT_STATUS_ERROR: "error",
    }
    for t in tracked:
        deployment = final.get(t.id)
        if deployment is None or not chaos_ops.at_rest(deployment):
            result.lost += 1
            seen = "never seen" if deployment is None else _describe(deployment)
            result.details.append(f"{t.id} ({t.name}) not at rest: {seen}")
            continue
        name = counts.get(deployment.status)
        if name is not None:
            setattr(result, name, getattr(result, name) + 1)
        check_by = time.monotonic() + 120
        expected = await chaos_ops.expectation(client, t, deployment, check_by)
        made = await chaos_ops.releases(client, t.id, check_by)
        problems = await asyncio.to_thread(chaos_ops.check_deployment, t, deployment, expected, made, state)
        if problems and all(p.startswith(chaos_ops.UNOBSERVED) for p in problems):
            result.unobserved += 1
            result.details.extend(problems)
            continue
        if not problems:
            continue
        if any(op.outcome == "accepted" for op in t.ops):
            result.mismatched += 1
        else:
            result.lost += 1
        result.details.extend(problems)


def _describe(deployment: pb.Deployment) -> str:
    return (
        f"{pb.DeploymentStatus.Name(deployment.status)} phase={deployment.phase} operation={deployment.operation!r} "
        f"reconciling={deployment.reconciling} release={deployment.release} healthy={deployment.healthy_release}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--deployments", type=int, default=200)
    parser.add_argument("--operations", type=int, default=300, help="random day-2 operations to issue")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=900, help="give up waiting after this long")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--database-url", default=None, help="default: a SQLite file in the work folder")
    parser.add_argument("--workdir", default=None, help="keep logs and data here (default: a temp folder)")
    parser.add_argument(
        "--nats-cluster",
        type=int,
        default=1,
        metavar="N",
        help="run NATS as a JetStream cluster of N nodes (streams replicated on 3), whose nodes are among the victims",
    )
    parser.add_argument("--verbose", action="store_true", help="print what was killed and every problem")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="apphosting-chaos-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        result = asyncio.run(
            run_chaos(
                workdir,
                deployments=args.deployments,
                operations=args.operations,
                kills=args.kills,
                seconds=args.seconds,
                seed=args.seed,
                database_url=args.database_url,
                nats_nodes=args.nats_cluster,
            )
        )
    if args.verbose or not result.ok:
        print("\n".join(result.details))
    if args.verbose:
        print(f"operations by kind: {dict(result.operations.kinds)}; refusals: {dict(result.operations.refused)}")
    print(result.line())
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
