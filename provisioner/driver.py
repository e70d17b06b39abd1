"""The cluster driver interface: idempotent steps on one location's host cluster, and their results."""

from __future__ import annotations

import enum
import hashlib
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from apphosting.v1 import bus_pb2, deployments_pb2

# A Kubernetes namespace is a DNS-1123 label.
_LABEL_MAX = 63
# Helm keeps release names to 53 characters so that the names it derives still fit in a label.
_RELEASE_MAX = 53
_NOT_LABEL_CHARS = re.compile(r"[^a-z0-9-]+")


class PermanentError(Exception):
    """The request cannot work as asked (bad chart, bad image); retrying will not help."""


class TemporaryError(Exception):
    """The platform failed this time (API timeout, conflict); the step is retried with backoff."""


class StepOutcome(enum.Enum):
    """What a step reports: done, not yet (poll again later), or failed."""

    DONE = "done"
    RETRY = "retry"
    FAIL = "fail"


@dataclass(frozen=True)
class StepResult:
    """The answer of one driver step; build it with `done`, `retry` or `fail`."""

    outcome: StepOutcome
    message: str
    after_seconds: float = 0.0
    permanent: bool = False
    # Values later steps or the status event need (kubeconfig, endpoint_url).
    fields: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def done(cls, message: str, **fields: str) -> StepResult:
        """The step's goal holds now (created, or found already there)."""
        return cls(StepOutcome.DONE, message, fields=dict(fields))

    @classmethod
    def retry(cls, after_seconds: float, message: str) -> StepResult:
        """Not yet: the reconciler polls the step again after `after_seconds`."""
        if after_seconds < 0:
            raise ValueError("after_seconds must not be negative")
        return cls(StepOutcome.RETRY, message, after_seconds=after_seconds)

    @classmethod
    def fail(cls, message: str, *, permanent: bool) -> StepResult:
        """The step failed: permanent ends the job, temporary is retried with backoff."""
        return cls(StepOutcome.FAIL, message, permanent=permanent)


class Driver(Protocol):
    """One location's host cluster, reached through idempotent steps.

    Every step derives its object names from the deployment id (see `host_namespace_name`,
    `vcluster_name`, `app_name`), so a step run twice finds its own work and does not repeat it.
    A step never sleeps: it answers `StepResult.retry` and the reconciler polls again. A step may
    report failure either by returning `StepResult.fail` or by raising `PermanentError` or
    `TemporaryError`.
    """

    # True when no real cluster is touched; every status event carries it.
    simulated: bool

    async def ensure_namespace(self, job: bus_pb2.ProvisionJob) -> StepResult:
        """Create the host namespace the vCluster lives in, or find it."""
        ...

    async def ensure_vcluster(self, job: bus_pb2.ProvisionJob) -> StepResult:
        """Install the vCluster into the host namespace, or find it."""
        ...

    async def vcluster_ready(self, job: bus_pb2.ProvisionJob) -> StepResult:
        """Done when the vCluster's API server answers; retry while it starts."""
        ...

    async def read_kubeconfig(self, job: bus_pb2.ProvisionJob) -> StepResult:
        """Done with field `kubeconfig`: the vCluster's kubeconfig."""
        ...

    async def ensure_app(self, job: bus_pb2.ProvisionJob, kubeconfig: str) -> StepResult:
        """Deploy the app (chart or image) as the job's deployment and release say: create it, change
        it where it differs (an update, a rollback, a start after a stop), or find it so."""
        ...

    async def app_rollout(self, job: bus_pb2.ProvisionJob, kubeconfig: str) -> StepResult:
        """Done when every replica of the job's release is available and healthy; retry while it rolls out."""
        ...

    async def applied_release(self, job: bus_pb2.ProvisionJob) -> int:
        """The release the deployment's app was last deployed as; 0 when there is no app (or it predates releases)."""
        ...

    async def stop_app(self, job: bus_pb2.ProvisionJob, kubeconfig: str) -> StepResult:
        """Scale the app to zero replicas, keeping its volumes and config; done once none runs."""
        ...

    async def sleep_vcluster(self, job: bus_pb2.ProvisionJob) -> StepResult:
        """Put the vCluster to sleep (its control plane scaled to zero); done once it is down."""
        ...

    async def wake_vcluster(self, job: bus_pb2.ProvisionJob) -> StepResult:
        """Scale the vCluster's control plane back up (vcluster_ready then waits for it)."""
        ...

    async def adopt_namespace(self, job: bus_pb2.ProvisionJob) -> StepResult:
        """Take the existing namespace `job.deployment.source_namespace` under management without
        recreating what runs there; a permanent failure when it does not exist."""
        ...

    async def release_namespace(self, job: bus_pb2.ProvisionJob) -> StepResult:
        """Give an adopted namespace back: drop what marks it managed, leave its workloads running."""
        ...

    async def endpoint(self, job: bus_pb2.ProvisionJob, kubeconfig: str) -> StepResult:
        """Done with field `endpoint_url`: where the app answers."""
        ...

    async def delete_app(self, job: bus_pb2.ProvisionJob) -> StepResult:
        """Remove the app; done only once it is confirmed gone (or was never there)."""
        ...

    async def delete_vcluster(self, job: bus_pb2.ProvisionJob) -> StepResult:
        """Uninstall the vCluster; done only once it is confirmed gone."""
        ...

    async def delete_namespace(self, job: bus_pb2.ProvisionJob) -> StepResult:
        """Delete the host namespace; done only once it is confirmed gone."""
        ...


def deployment_key(deployment: deployments_pb2.Deployment) -> str:
    """Twelve hex digits that identify the deployment in every name derived from it."""
    try:
        return uuid.UUID(deployment.id).hex[:12]
    except ValueError:
        # Ids are UUIDs in practice; a hash keeps names deterministic for anything else.
        return hashlib.sha256(deployment.id.encode()).hexdigest()[:12]


def _label(*parts: str, limit: int) -> str:
    cleaned = [_NOT_LABEL_CHARS.sub("-", part.lower()).strip("-") for part in parts]
    return "-".join(part for part in cleaned if part)[:limit].rstrip("-")


def host_namespace_name(deployment: deployments_pb2.Deployment) -> str:
    """The host namespace of a deployment: `vc-<12 hex of id>-<name>`, at most 63 characters; an
    adopted deployment's is the namespace it was adopted from."""
    if deployment.is_adopted and deployment.source_namespace:
        return deployment.source_namespace
    return _label("vc", deployment_key(deployment), deployment.name, limit=_LABEL_MAX)


def vcluster_name(deployment: deployments_pb2.Deployment) -> str:
    """The vCluster (Helm release) name: `vc-<12 hex of id>-<name>`, at most 53 characters."""
    return _label("vc", deployment_key(deployment), deployment.name, limit=_RELEASE_MAX)


def app_name(deployment: deployments_pb2.Deployment) -> str:
    """The app's release name inside its vCluster: the deployment name, at most 53 characters."""
    return _label(deployment.name, limit=_RELEASE_MAX) or "app"
