"""Random day-2 operations for the chaos run, their outcomes, and the check of each deployment's end state."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from google.protobuf import field_mask_pb2

from apphosting.v1 import deployments_pb2 as pb
from provisioner.driver import app_name, vcluster_name
from provisioner.simulated import NEVER_HEALTHY_MARK, SimulatedState
from tests.support.grpc_errors import details_of

if TYPE_CHECKING:
    from apphosting.v1.deployments_pb2_grpc import DeploymentServiceAsyncStub

# Codes after which a call may or may not have been applied: it is sent again, then looked up.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED})
# Refusals the API gives by design while operations race each other, the lifecycle and the kills.
EXPECTED_REFUSALS = frozenset({grpc.StatusCode.ABORTED, grpc.StatusCode.FAILED_PRECONDITION, *RETRYABLE})
AT_REST = frozenset(
    {
        pb.DEPLOYMENT_STATUS_RUNNING,
        pb.DEPLOYMENT_STATUS_STOPPED,
        pb.DEPLOYMENT_STATUS_FAILED,
        pb.DEPLOYMENT_STATUS_ERROR,
    }
)
_ATTEMPTS = 4
# The start of a problem that is the simulation's blind spot, not a difference the run could see.
UNOBSERVED = "unobserved"
_KINDS = ("update", "scale", "stop", "start", "rollback", "promote")
_WEIGHTS = (30, 25, 15, 15, 10, 5)
# What each status allows (services/deployments/lifecycle.py); most operations are chosen to fit.
_FITTING = {
    pb.DEPLOYMENT_STATUS_RUNNING: ("update", "scale", "stop", "rollback", "promote"),
    pb.DEPLOYMENT_STATUS_STOPPED: ("update", "scale", "start", "rollback"),
    pb.DEPLOYMENT_STATUS_FAILED: ("update", "scale"),
    pb.DEPLOYMENT_STATUS_ERROR: ("update", "scale"),
}


class Stubs(Protocol):
    def stub(self, n: int) -> DeploymentServiceAsyncStub: ...


def at_rest(deployment: pb.Deployment) -> bool:
    return deployment.status in AT_REST and not deployment.reconciling and not deployment.operation


@dataclass
class Tracked:
    """An accepted deployment and what the accepted operations on it asked for."""

    id: str
    name: str
    fails: bool
    ops: list[Op] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class Op:
    """One day-2 call: its outcome, or `uncertain` when the answer was lost and the history decides."""

    number: int
    kind: str
    token: str
    outcome: str = ""  # accepted, refused, failure, uncertain
    release: int = 0
    copy_name: str = ""
    code: str = ""


@dataclass
class OpStats:
    issued: int = 0
    accepted: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    kinds: Counter[str] = field(default_factory=Counter)

    def line(self) -> str:
        refused = sum(self.refused.values())
        failures = len(self.failures)
        return f"operations={self.issued} op_accepted={self.accepted} op_refused={refused} op_failures={failures}"


async def _get(client: Stubs, deployment_id: str, deadline: float) -> pb.Deployment | None:
    attempt = 0
    while time.monotonic() < deadline:
        try:
            return await client.stub(attempt).GetDeployment(pb.GetDeploymentRequest(id=deployment_id), timeout=10)
        except grpc.aio.AioRpcError as error:
            if error.code() not in RETRYABLE:
                raise
        attempt += 1
        await asyncio.sleep(0.3)
    return None


def _request(kind: str, current: pb.Deployment, op: Op, rng: random.Random) -> tuple[str, Any]:
    etag = current.etag
    if kind == "update":
        image = f"ghcr.io/acme/web:2.{op.number}.0"
        # A release that never gets healthy is rolled back by the platform; only a running one rolls
        # out at once, so only then (a recorded one would fail a later start instead).
        if current.status == pb.DEPLOYMENT_STATUS_RUNNING and rng.random() < 0.15:
            image = f"ghcr.io/acme/web:{NEVER_HEALTHY_MARK}-{op.number}"
        return "UpdateDeployment", pb.UpdateDeploymentRequest(
            deployment=pb.Deployment(id=current.id, docker_image=image),
            update_mask=field_mask_pb2.FieldMask(paths=["docker_image"]),
            etag=etag,
            reason=op.token,
        )
    if kind == "scale":
        return "ScaleDeployment", pb.ScaleDeploymentRequest(
            id=current.id, replicas=rng.randint(1, 3), etag=etag, reason=op.token
        )
    if kind == "stop":
        return "StopDeployment", pb.StopDeploymentRequest(id=current.id, etag=etag, reason=op.token)
    if kind == "start":
        return "StartDeployment", pb.StartDeploymentRequest(id=current.id, etag=etag, reason=op.token)
    if kind == "rollback":
        return "RollbackDeployment", pb.RollbackDeploymentRequest(
            id=current.id, release=rng.choice((0, 1)) if current.release > 1 else 0, etag=etag, reason=op.token
        )
    op.copy_name = f"{current.name}-p{op.number}"
    return "PromoteDeployment", pb.PromoteDeploymentRequest(
        id=current.id, new_name=op.copy_name, etag=etag, request_id=str(uuid.uuid4())
    )


# How long an operation waits for a deployment at rest before it is sent to one that is not.
_PATIENCE = 60.0


class Operator:
    """Issues random day-2 operations on the tracked deployments and records what each came to."""

    def __init__(self, client: Stubs, tracked: list[Tracked], rng: random.Random, deadline: float) -> None:
        self.client = client
        self.tracked = tracked
        self.rng = rng
        self.deadline = deadline
        self.stats = OpStats()

    async def run(self, count: int, span: float, start_after: float, concurrency: int = 8) -> None:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for number in range(count):
            queue.put_nowait(number)
        began = time.monotonic() + start_after

        async def worker() -> None:
            while not queue.empty():
                number = queue.get_nowait()
                # Spread over the span, so the operations meet the kills and the creations.
                await asyncio.sleep(max(0.0, began + span * number / max(1, count) - time.monotonic()))
                await self.one(number)

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    async def one(self, number: int) -> None:
        # Looks for a deployment at rest, so most operations meet one they may change; the refusals come
        # from the races and the kills, and from an operation that found none at rest for a long while.
        # Waited for, not looked for a few times: on a loaded machine every deployment can still be
        # provisioning for the whole of the operations' span.
        patience = min(self.deadline, time.monotonic() + _PATIENCE)
        target: Tracked | None = None
        current: pb.Deployment | None = None
        look = 0
        while look < 3 or time.monotonic() < patience:
            if look >= 3:
                await asyncio.sleep(0.5)
            look += 1
            pool = [t for t in self.tracked if not t.lock.locked()]
            if not pool:
                continue
            target = self.rng.choice(pool)
            async with target.lock:
                current = await _get(self.client, target.id, min(self.deadline, time.monotonic() + 30))
                if current is not None and at_rest(current):
                    await self._issue(number, target, current)
                    return
        if target is not None and current is not None and not target.lock.locked():
            async with target.lock:
                await self._issue(number, target, current)

    async def _issue(self, number: int, target: Tracked, current: pb.Deployment) -> None:
        fitting = _FITTING.get(current.status)
        if fitting and self.rng.random() < 0.85:
            weights = [w for k, w in zip(_KINDS, _WEIGHTS, strict=True) if k in fitting]
            kind = self.rng.choices([k for k in _KINDS if k in fitting], weights)[0]
        else:
            kind = self.rng.choices(_KINDS, _WEIGHTS)[0]
        op = Op(number, kind, f"chaos-op-{number}-{uuid.uuid4().hex[:8]}")
        target.ops.append(op)
        self.stats.issued += 1
        self.stats.kinds[kind] += 1
        method, request = _request(kind, current, op, self.rng)
        await self._send(target, op, method, request)

    async def _send(self, target: Tracked, op: Op, method: str, request: Any) -> None:
        lost_answer = False
        for attempt in range(_ATTEMPTS):
            try:
                answer = await getattr(self.client.stub(op.number + attempt), method)(request, timeout=15)
            except grpc.aio.AioRpcError as error:
                details = details_of(error)
                op.code = f"{error.code().name} {details.reason}".strip()
                if error.code() in RETRYABLE and attempt + 1 < _ATTEMPTS:
                    lost_answer = True
                    await asyncio.sleep(0.5)
                    continue
                if error.code() not in EXPECTED_REFUSALS:
                    op.outcome = "failure"
                    self.stats.failures.append(f"{method} of {target.id}: {error.code().name} {details.message}")
                elif lost_answer or error.code() in RETRYABLE:
                    # An earlier attempt may have been applied before its answer was lost (a retry with
                    # the same etag is then refused); the deployment's history says which.
                    op.outcome = "uncertain"
                    self.stats.refused[op.code] += 1
                else:
                    op.outcome = "refused"
                    self.stats.refused[op.code] += 1
                return
            op.outcome = "accepted"
            self.stats.accepted += 1
            if isinstance(answer, pb.PromoteDeploymentResponse):
                op.release = answer.source.release
                # The copy is a deployment like the others: it must settle, and may be operated on.
                self.tracked.append(Tracked(answer.target.id, answer.target.name, fails=False))
            else:
                op.release = answer.release
            return


async def history(client: Stubs, deployment_id: str, until: int, deadline: float) -> list[pb.DeploymentEvent]:
    """Every logged event of a deployment after its creation, up to revision `until`."""
    events: list[pb.DeploymentEvent] = []
    last = 1
    attempt = 0
    while last < until and time.monotonic() < deadline:
        stream = client.stub(attempt).WatchDeployment(pb.WatchDeploymentRequest(id=deployment_id, since_revision=last))
        try:
            async with asyncio.timeout(30):
                async for item in stream:
                    if not item.HasField("event"):
                        continue
                    events.append(item.event)
                    last = item.event.revision
                    if last >= until or item.event.final:
                        break
        except (grpc.aio.AioRpcError, TimeoutError) as error:
            if isinstance(error, grpc.aio.AioRpcError) and error.code() not in RETRYABLE:
                raise
            attempt += 1
            await asyncio.sleep(0.3)
        finally:
            stream.cancel()
    return events


async def releases(client: Stubs, deployment_id: str, deadline: float) -> list[pb.Release]:
    attempt = 0
    while time.monotonic() < deadline:
        try:
            found: list[pb.Release] = []
            token = ""
            while True:
                page = await client.stub(attempt).ListReleases(
                    pb.ListReleasesRequest(id=deployment_id, page_size=1000, page_token=token), timeout=10
                )
                found.extend(page.releases)
                token = page.next_page_token
                if not token:
                    return found
        except grpc.aio.AioRpcError as error:
            if error.code() not in RETRYABLE:
                raise
        attempt += 1
        await asyncio.sleep(0.3)
    return []


async def find_by_name(client: Stubs, names: set[str], deadline: float) -> dict[str, pb.Deployment]:
    """The deployments with these names (the copies of promotes whose answer was lost)."""
    attempt = 0
    while names and time.monotonic() < deadline:
        try:
            found: dict[str, pb.Deployment] = {}
            token = ""
            while True:
                page = await client.stub(attempt).ListDeployments(
                    pb.ListDeploymentsRequest(page_size=1000, page_token=token, show_deleted=True), timeout=10
                )
                found.update({d.name: d for d in page.deployments if d.name in names})
                token = page.next_page_token
                if not token:
                    return found
        except grpc.aio.AioRpcError as error:
            if error.code() not in RETRYABLE:
                raise
        attempt += 1
        await asyncio.sleep(0.3)
    return {}


async def wait_at_rest(client: Stubs, ids: list[str], deadline: float) -> dict[str, pb.Deployment]:
    """Each deployment once every one is at rest, or as they stand at the deadline."""
    latest: dict[str, pb.Deployment] = {}
    attempt = 0
    while True:
        for deployment_id in ids:
            known = latest.get(deployment_id)
            if known is not None and at_rest(known):
                continue
            try:
                latest[deployment_id] = await client.stub(attempt).GetDeployment(
                    pb.GetDeploymentRequest(id=deployment_id), timeout=10
                )
            except grpc.aio.AioRpcError as error:
                if error.code() not in RETRYABLE:
                    raise
                attempt += 1
        if all(i in latest and at_rest(latest[i]) for i in ids) or time.monotonic() > deadline:
            return latest
        await asyncio.sleep(0.5)


@dataclass
class Expected:
    release: int = 1
    running: bool = True


async def expectation(client: Stubs, tracked: Tracked, final: pb.Deployment, deadline: float) -> Expected:
    """What the accepted operations on a deployment asked for, in the order they were accepted."""
    expected = Expected()
    events: list[pb.DeploymentEvent] | None = None
    for op in tracked.ops:
        if op.outcome == "uncertain":
            if events is None:
                events = await history(client, tracked.id, final.revision, deadline)
            made = [e for e in events if op.token in e.message and e.source == "api"]
            if op.kind == "promote":
                continue
            if not made:
                op.outcome = "refused"
                continue
            op.outcome = "accepted"
            op.release = made[0].release
        if op.outcome != "accepted":
            continue
        if op.kind in ("update", "scale", "rollback"):
            expected.release = op.release
        elif op.kind == "stop":
            expected.running = False
        elif op.kind == "start":
            expected.running = True
    return expected


def _source(deployment: pb.Deployment) -> str:
    # The simulated driver's description of what an app runs (provisioner/simulated.py _app_source).
    return f"image {deployment.docker_image}"


def check_deployment(
    tracked: Tracked,
    final: pb.Deployment,
    expected: Expected,
    made: list[pb.Release],
    state: SimulatedState,
) -> list[str]:
    """Why the deployment's end state is not what its accepted operations asked for; empty when it is."""
    problems: list[str] = []
    who = f"{tracked.id} ({tracked.name})"
    later = [r for r in made if r.number > expected.release]
    if final.release < expected.release or any(r.operation != "rollback-automatic" for r in later):
        problems.append(
            f"{who} is at release {final.release}; the last accepted release was {expected.release} "
            f"(later releases: {[(r.number, r.operation) for r in later]})"
        )
    if tracked.fails:
        if final.status != pb.DEPLOYMENT_STATUS_FAILED:
            problems.append(f"{who} built to fail ended {pb.DeploymentStatus.Name(final.status)}")
        return problems
    want = pb.DEPLOYMENT_STATUS_RUNNING if expected.running else pb.DEPLOYMENT_STATUS_STOPPED
    if final.status != want:
        problems.append(
            f"{who} ended {pb.DeploymentStatus.Name(final.status)}, expected {pb.DeploymentStatus.Name(want)} "
            f"({final.error_message})"
        )
        return problems
    app = state.attributes("app", f"{vcluster_name(final)}/{app_name(final)}")
    vcluster = state.attributes("vcluster", vcluster_name(final)) or {}
    if app is None:
        if state.exists("app", f"{vcluster_name(final)}/{app_name(final)}"):
            # The simulated driver claims an app and writes what it runs in two steps; a worker
            # killed between them leaves an app whose release no one recorded.
            problems.append(f"{UNOBSERVED}: {who} has an app in the simulated clusters with no recorded release")
        else:
            problems.append(f"{who} has no app in the simulated clusters")
        return problems
    if want == pb.DEPLOYMENT_STATUS_STOPPED:
        if app["replicas"] != 0 or not vcluster.get("asleep"):
            problems.append(f"{who} is stopped but its app runs {app} (vCluster {vcluster})")
        return problems
    replicas = final.replicas if final.HasField("replicas") else 1
    observed = (app["release"], app["source"], app["replicas"])
    recorded = (final.release, _source(final), replicas)
    if observed != recorded or vcluster.get("asleep"):
        problems.append(f"{who} runs {observed} (vCluster {vcluster}); its record says {recorded}")
    if final.healthy_release != final.release:
        problems.append(f"{who} at rest at release {final.release} but healthy_release {final.healthy_release}")
    return problems
