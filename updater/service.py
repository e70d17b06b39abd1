"""The image updater process: every interval, each repository in use is read once and its deployments updated.

It is a client of the API like any other (apphosting_client), authenticated with the service token whose subject
is ``image-updater`` (services/deployments/auth.py says what that identity may do). A round:

1. lists the running deployments (every owner's: the identity sees them all) and keeps those with an
   ``image_update_strategy``, not paused by a rollback and with no operation in flight;
2. groups them by registry and repository; a repository is read at most once per interval however many
   deployments use it, and a registry that failed or asked us to slow down (429, ``Retry-After``) is not asked
   again before its :class:`apphosting.registry.Backoff` allows;
3. plans every deployment against its repository's snapshot (apphosting/imageupdates.py, as PreviewImageUpdate
   does) and, where the plan says would_update, updates docker_image through UpdateDeployment with the etag it
   listed: a deployment changed meanwhile is refused and looked at again next round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from prometheus_client import Counter

from apphosting import imageupdates, metrics, registry
from apphosting.imagepolicy import Policy
from apphosting.imageupdates import RegistryAccess, Target
from apphosting.locations import load_locations
from apphosting.v1 import deployments_pb2 as pb
from apphosting_client import AsyncClient, ClientConfig

log = logging.getLogger(__name__)

__all__ = ["Updater", "UpdaterOptions", "serve"]

# Repositories read at once in a round.
_CONCURRENT_REPOSITORIES = 4


@dataclass(frozen=True)
class UpdaterOptions:
    client: ClientConfig = field(default_factory=ClientConfig)
    # Seconds between rounds; no repository is read more often than this.
    interval: float = 300.0
    registries: RegistryAccess = field(default_factory=RegistryAccess)
    # host:port serving Prometheus metrics at /metrics (port 0: any free one); None: no metrics server.
    metrics_listen: str | None = None
    # The locations file: deployments on a location whose image_updater is argocd are Argo CD Image
    # Updater's, not ours. None: the sample locations.
    locations_file: str | None = None


@dataclass(frozen=True)
class _Candidate:
    deployment: pb.Deployment
    target: Target
    policy: Policy
    reference: registry.ImageReference


@dataclass
class RoundResult:
    """What one round did: repositories read, deployments updated, and what was left for later."""

    polled: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def target_of(deployment: pb.Deployment) -> Target:
    """A deployment's image and policy fields (absent fields None, as stored)."""
    d = deployment
    return Target(
        d.docker_image,
        d.image_update_strategy if d.HasField("image_update_strategy") else None,
        d.image_update_constraint if d.HasField("image_update_constraint") else None,
        d.image_allow_tags if d.HasField("image_allow_tags") else None,
        d.image_ignore_tags if d.HasField("image_ignore_tags") else None,
        paused=d.image_updates_paused,
    )


class Updater:
    def __init__(
        self,
        options: UpdaterOptions,
        *,
        registry_client: registry.RegistryClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.options = options
        self._registry = registry_client if registry_client is not None else options.registries.client()
        self._client = AsyncClient(options.client)
        self._clock = clock
        # Locations whose images Argo CD Image Updater follows (LocationConfig.image_updater): left alone.
        self._argocd_locations = frozenset(
            location.id
            for location in load_locations(options.locations_file).locations
            if location.image_updater == "argocd"
        )
        # When each repository was last read (clock time).
        self._polled: dict[str, float] = {}
        # Rounds finished by run(), whatever their outcome.
        self.rounds = 0
        self.metrics_registry = metrics.registry()
        self.metrics_server: metrics.MetricsServer | None = None
        self._polls = Counter(
            "apphosting_image_updater_polls",
            "Repository reads, by outcome (ok, not-found, unauthorized, rate-limited, unavailable, malformed, "
            "address-refused)",
            ["outcome"],
            registry=self.metrics_registry,
        )
        self._updates = Counter(
            "apphosting_image_updater_updates",
            "Updates the updater asked for, by outcome (made, refused)",
            ["outcome"],
            registry=self.metrics_registry,
        )

    def start_metrics(self) -> metrics.MetricsServer | None:
        """Serves /metrics on options.metrics_listen, when set."""
        if self.options.metrics_listen is not None and self.metrics_server is None:
            self.metrics_server = metrics.MetricsServer(self.metrics_registry, self.options.metrics_listen)
            self.metrics_server.start()
        return self.metrics_server

    async def close(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.stop()
        await self._client.close()
        await self._registry.aclose()

    async def _eligible(self) -> list[_Candidate]:
        found: list[_Candidate] = []
        async for deployment in self._client.list_all(statuses=[pb.DEPLOYMENT_STATUS_RUNNING]):
            if not deployment.docker_image or not deployment.image_update_strategy:
                continue
            if deployment.image_updates_paused or deployment.reconciling:
                continue
            if deployment.location_id in self._argocd_locations:
                continue
            target = target_of(deployment)
            try:
                policy = imageupdates.policy_of(target)
                reference = target.reference
            except (imageupdates.PolicyUnusable, ValueError) as unusable:
                log.warning("deployment %s: cannot apply its image update policy: %s", deployment.id, unusable)
                continue
            found.append(_Candidate(deployment, target, policy, reference))
        return found

    async def run_round(self) -> RoundResult:
        """Lists, reads each due repository once, updates what its plan says; returns what it did."""
        result = RoundResult()
        groups: dict[tuple[str, str], list[_Candidate]] = {}
        for candidate in await self._eligible():
            groups.setdefault((candidate.reference.registry, candidate.reference.repository), []).append(candidate)
        limit = asyncio.Semaphore(_CONCURRENT_REPOSITORIES)

        async def one(key: tuple[str, str], members: list[_Candidate]) -> None:
            async with limit:
                await self._repository(key[0], key[1], members, result)

        async with asyncio.TaskGroup() as group:
            for key, members in groups.items():
                group.create_task(one(key, members))
        return result

    async def _repository(self, host: str, repository: str, members: list[_Candidate], result: RoundResult) -> None:
        name = f"{host}/{repository}"
        now = self._clock()
        last = self._polled.get(name)
        if last is not None and now - last < self.options.interval:
            result.skipped.append(name)
            return
        if not self._registry.backoff.allowed(host):
            log.info("%s: registry backing off; not read this round", name)
            result.skipped.append(name)
            return
        self._polled[name] = now
        try:
            snapshot = await imageupdates.fetch_snapshot(
                self._registry, host, repository, [member.policy for member in members]
            )
        except registry.RegistryError as failure:
            self._polls.labels(_outcome(failure)).inc()
            log.warning("%s: cannot read the repository: %s", name, failure)
            result.failed.append(name)
            return
        self._polls.labels("ok").inc()
        result.polled.append(name)
        for member in members:
            plan = imageupdates.plan(member.target, member.policy, snapshot)
            if plan.would_update and await self._update(member.deployment, plan):
                result.updated.append(member.deployment.id)

    async def _update(self, deployment: pb.Deployment, plan: imageupdates.Plan) -> bool:
        try:
            await self._client.update(
                pb.Deployment(id=deployment.id, docker_image=plan.new_docker_image),
                ["docker_image"],
                etag=deployment.etag,
                reason=plan.update_reason,
            )
        except grpc.aio.AioRpcError as refused:
            # A stale etag or an operation started meanwhile: the next round reads the deployment again.
            self._updates.labels("refused").inc()
            log.info("deployment %s: update to %s refused: %s", deployment.id, plan.new_docker_image, refused.details())
            return False
        self._updates.labels("made").inc()
        log.info("deployment %s: updated to %s (%s)", deployment.id, plan.new_docker_image, plan.reason)
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Rounds until `stop` is set, one interval apart; a round that fails is logged and the next one tried.

        A round under way when `stop` is set is abandoned (its calls may be retrying against an API that is gone);
        an update it already asked for is the API's to finish.
        """
        stopped = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                round_ = asyncio.create_task(self.run_round())
                await asyncio.wait({round_, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if not round_.done():
                    round_.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await round_
                    return
                self._report(round_)
                self.rounds += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(stopped), self.options.interval)
        finally:
            stopped.cancel()

    def _report(self, done: asyncio.Task[RoundResult]) -> None:
        failure = done.exception()
        if isinstance(failure, grpc.aio.AioRpcError):
            log.warning("round abandoned: the API answered %s: %s", failure.code().name, failure.details())
        elif failure is not None:
            log.error("round abandoned", exc_info=failure)
        else:
            result = done.result()
            log.log(
                logging.INFO if result.polled or result.failed else logging.DEBUG,
                "round: %d repositories read, %d updated, %d failed",
                len(result.polled),
                len(result.updated),
                len(result.failed),
            )


def _outcome(failure: registry.RegistryError) -> str:
    kinds: list[tuple[type[registry.RegistryError], str]] = [
        (registry.NotFound, "not-found"),
        (registry.Unauthorized, "unauthorized"),
        (registry.RateLimited, "rate-limited"),
        (registry.RegistryUnavailable, "unavailable"),
        (registry.MalformedResponse, "malformed"),
        (registry.AddressRefused, "address-refused"),
    ]
    return next((label for kind, label in kinds if isinstance(failure, kind)), "unavailable")


async def serve(options: UpdaterOptions, stop: asyncio.Event) -> None:
    updater = Updater(options)
    if (served := updater.start_metrics()) is not None:
        print(f"image-updater: metrics on {served.url}", flush=True)
    print(f"image-updater: API {options.client.address}, every {options.interval:g} s", flush=True)
    try:
        await updater.run(stop)
    finally:
        await updater.close()
