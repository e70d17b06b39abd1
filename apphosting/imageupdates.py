"""What an image update would do for one deployment: a repository snapshot fetched once, and a pure plan.

The API's PreviewImageUpdate and the updater process share both halves: :func:`fetch_snapshot` reads what the
policies of a repository need from its registry (the tag list; the digest of a followed tag for ``digest``; the
config ``created`` of each tag the filters keep for ``newest-build``), and :func:`plan` applies one deployment's
policy to a snapshot (``imagepolicy.select_tag``) and says what an update would set. A repository used by many
deployments is fetched once for all of them: the snapshot holds the union of what their policies need.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from apphosting import images, netguard
from apphosting.imagepolicy import (
    Candidate,
    Policy,
    PolicyError,
    Selection,
    Strategy,
    Verdict,
    parse_allow_tags,
    parse_ignore_tags,
    parse_strategy,
    select_tag,
)
from apphosting.registry import (
    AddressRefused,
    Credentials,
    ImageReference,
    RegistryClient,
    RegistryUnavailable,
    load_docker_config,
    normalize_host,
)

__all__ = [
    "UPDATER_ACTOR",
    "Plan",
    "PolicyUnusable",
    "RegistryAccess",
    "Snapshot",
    "Target",
    "fetch_snapshot",
    "plan",
    "policy_of",
    "public_or_named",
]

# Who the updater's releases and events name as their actor, and the subject of its service token.
UPDATER_ACTOR: Final = "image-updater"
# Manifest and config requests to one registry under way at once while a snapshot is read.
_CONCURRENT_REQUESTS: Final = 4


@dataclass(frozen=True)
class RegistryAccess:
    """How this process reaches registries: credentials by host from a Docker config.json, and the hosts spoken to
    over plain HTTP (loopback registries). The API and the updater take the same flags for it."""

    credentials_file: str | None = None
    plain_http: tuple[str, ...] = ()

    def credentials(self) -> dict[str, Credentials]:
        """The credentials of the file; raises ValueError naming the file and entry when it cannot be used."""
        return load_docker_config(Path(self.credentials_file)) if self.credentials_file else {}

    def client(self, resolver: netguard.Resolver | None = None) -> RegistryClient:
        """A client that asks only public hosts, and the internal ones named here (plain HTTP or credentials)."""
        credentials = self.credentials()
        trusted = frozenset(normalize_host(host) for host in (*self.plain_http, *credentials))
        return RegistryClient(
            credentials,
            plain_http=self.plain_http,
            # A host's addresses are looked up once a minute at most for the check.
            guard=public_or_named(trusted, resolver or netguard.CachingResolver()),
        )


def public_or_named(trusted: frozenset[str], resolver: netguard.Resolver) -> Callable[[str], Awaitable[None]]:
    """The guard of a registry client: a host the operator named is asked; any other must be public.

    docker_image names whatever host its author likes: without this the API (previews) and the updater would send
    requests, and show parts of the answers, to loopback, private and cluster-internal addresses. The name is
    resolved here and again when httpx connects; a name that changes its answer in between is not caught.
    """

    async def check(netloc: str) -> None:
        if normalize_host(netloc) in trusted:
            return
        host = urlsplit(f"//{netloc}").hostname or netloc
        try:
            await netguard.resolve_public(host, resolver=resolver)
        except netguard.Refused as refused:
            raise AddressRefused(netloc, f"not asked: {refused}") from None
        except netguard.Unresolvable as unresolvable:
            raise RegistryUnavailable(netloc, str(unresolvable)) from None

    return check


@dataclass(frozen=True)
class Target:
    """A deployment's image and image update fields, as stored."""

    docker_image: str
    strategy: str | None = None
    constraint: str | None = None
    allow_tags: str | None = None
    ignore_tags: str | None = None
    paused: bool = False

    @property
    def reference(self) -> ImageReference:
        """The parsed docker_image; raises ValueError when it is not a valid reference."""
        return ImageReference.parse(self.docker_image)


class PolicyUnusable(ValueError):
    """A stored image update field that cannot be applied; ``field`` names it."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


def policy_of(target: Target) -> Policy:
    """The parsed policy; raises PolicyUnusable naming the first field that cannot be applied."""
    try:
        parse_strategy(target.strategy)
    except PolicyError as bad:
        raise PolicyUnusable("image_update_strategy", str(bad)) from None
    try:
        parse_allow_tags(target.allow_tags)
    except PolicyError as bad:
        raise PolicyUnusable("image_allow_tags", str(bad)) from None
    try:
        parse_ignore_tags(target.ignore_tags)
    except PolicyError as bad:
        raise PolicyUnusable("image_ignore_tags", str(bad)) from None
    try:
        return Policy.parse(target.strategy, target.constraint, target.allow_tags, target.ignore_tags)
    except PolicyError as bad:
        raise PolicyUnusable("image_update_constraint", str(bad)) from None


@dataclass(frozen=True)
class Snapshot:
    """A repository's tags as read at one time, each with its digest and created time where a policy asked."""

    registry: str
    repository: str
    candidates: tuple[Candidate, ...]

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"


def _filters_keep(policy: Policy, tag: str) -> bool:
    return not policy.ignore.disables_updates and policy.ignore.ignored_by(tag) is None and policy.allow.allows(tag)


async def fetch_snapshot(
    client: RegistryClient, registry: str, repository: str, policies: Iterable[Policy]
) -> Snapshot:
    """Reads the repository once for every policy given: tags, then digests and created times only where asked.

    Raises the registry's errors (NotFound, Unauthorized, RateLimited, RegistryUnavailable, MalformedResponse).
    """
    wanted = tuple(policies)
    tags = await client.list_tags(registry, repository)
    followed = {p.follow_tag for p in wanted if p.strategy is Strategy.DIGEST}
    builds = [p for p in wanted if p.strategy is Strategy.NEWEST_BUILD]
    need_created = [tag for tag in tags if any(_filters_keep(p, tag) for p in builds)]
    need_digest = [tag for tag in tags if tag in followed and tag not in need_created]
    limit = asyncio.Semaphore(_CONCURRENT_REQUESTS)
    created: dict[str, datetime | None] = {}
    digests: dict[str, str] = {}

    async def read_created(tag: str) -> None:
        async with limit:
            top, image = await client.resolve(registry, repository, tag)
            digests[tag] = top.digest
            created[tag] = (await client.get_config(registry, repository, image)).created

    async def read_digest(tag: str) -> None:
        async with limit:
            digests[tag] = await client.get_digest(registry, repository, tag)

    try:
        async with asyncio.TaskGroup() as group:
            for tag in need_created:
                group.create_task(read_created(tag))
            for tag in need_digest:
                group.create_task(read_digest(tag))
    except ExceptionGroup as failed:
        # The first failure says what went wrong; the others were cancelled with it.
        raise failed.exceptions[0] from None
    candidates = tuple(Candidate(tag, created.get(tag), digests.get(tag)) for tag in tags)
    return Snapshot(registry, repository, candidates)


@dataclass(frozen=True)
class Plan:
    """What the policy says of one deployment now: every verdict, the winner and why, and what an update sets."""

    repository: str
    strategy: Strategy
    current_tag: str
    current_digest: str
    verdicts: tuple[Verdict, ...]
    winner: str
    winner_digest: str
    reason: str
    would_update: bool
    paused: bool
    new_docker_image: str
    selection: Selection = field(repr=False)

    @property
    def update_reason(self) -> str:
        """The reason the updater gives its release and event."""
        return f"{UPDATER_ACTOR}: tag {self.winner}, {self.reason}"


def plan(target: Target, policy: Policy, snapshot: Snapshot) -> Plan:
    """Applies one deployment's policy to a snapshot of its repository; pure.

    The new image keeps the registry and repository as the deployment wrote them; the digest strategy pins
    ``name:tag@sha256:...``, so a moved tag is a new image string (and so a new release) while the tag stays
    readable, and the current digest is the one the docker_image pins.
    """
    name, current_tag, current_digest = images.split(target.docker_image)
    selection = select_tag(policy, snapshot.candidates, current_tag, current_digest)
    winner = selection.winner
    new_image = ""
    if winner is not None and selection.changed:
        if policy.strategy is Strategy.DIGEST:
            new_image = f"{name}:{winner.tag}@{winner.digest}"
        else:
            new_image = f"{name}:{winner.tag}"
    why = selection.why
    if target.paused and selection.changed:
        why += "; updates are paused since a rollback (an update of an image_* field turns them on again)"
    return Plan(
        repository=snapshot.name,
        strategy=policy.strategy,
        current_tag=current_tag or "",
        current_digest=current_digest or "",
        verdicts=selection.verdicts,
        winner=winner.tag if winner is not None else "",
        winner_digest=(winner.digest or "") if winner is not None else "",
        reason=why,
        would_update=selection.changed and not target.paused and bool(new_image),
        paused=target.paused,
        new_docker_image=new_image,
        selection=selection,
    )
