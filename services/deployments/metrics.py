"""The API's Prometheus metrics: gRPC server calls, deployments by status, lifecycle durations, outbox, watches."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy import func, select

from apphosting import metrics, phases
from apphosting.batching import Batcher
from apphosting.v1 import bus_pb2
from apphosting.v1 import deployments_pb2 as pb
from services.deployments.convert import STATUS_NAMES
from services.deployments.store import Change, DeploymentStore
from services.deployments.tables import DeploymentRow, EventRow, OutboxRow

# Methods of the services this server registers: anything else (an unknown method) is one label value.
_KNOWN_METHODS: frozenset[str] = frozenset(
    f"/{service.full_name}/{method.name}"
    for service in (pb.DESCRIPTOR.services_by_name["DeploymentService"],)
    for method in service.methods
) | {
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
}
_QUOTA_REASON = "QUOTA_EXCEEDED"
_STATUS_DETAILS_KEY = "grpc-status-details-bin"
_RUNNING = STATUS_NAMES[pb.DEPLOYMENT_STATUS_RUNNING]
_PROVISIONING = STATUS_NAMES[pb.DEPLOYMENT_STATUS_PROVISIONING]


# Live deployments by status and region: read from the index of deletion times, which holds both in that order.
LIVE_COUNTS = (
    select(DeploymentRow.status, DeploymentRow.geographic_region, func.count())
    .where(DeploymentRow.deleted_at.is_(None))
    .group_by(DeploymentRow.status, DeploymentRow.geographic_region)
)


def _split(method: str) -> tuple[str, str]:
    if method not in _KNOWN_METHODS:
        return metrics.OTHER, metrics.OTHER
    service, _, name = method.lstrip("/").partition("/")
    return service, name


class GrpcMetrics:
    """The gRPC ecosystem's server metrics (py-grpc-prometheus, go-grpc-prometheus names and labels)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("grpc_type", "grpc_service", "grpc_method")
        self.started = Counter(
            "grpc_server_started_total", "Total number of RPCs started on the server.", labels, registry=registry
        )
        self.handled = Counter(
            "grpc_server_handled_total",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            (*labels, "grpc_code"),
            registry=registry,
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
            labels,
            buckets=metrics.REQUEST_BUCKETS,
            registry=registry,
        )
        self.msg_sent = Counter(
            "grpc_server_msg_sent_total",
            "Total number of gRPC stream messages sent by the server.",
            labels,
            registry=registry,
        )
        self.quota_refusals = Counter(
            "apphosting_quota_refusals_total",
            "Requests refused because the caller's quota would be exceeded (RESOURCE_EXHAUSTED, QUOTA_EXCEEDED)",
            ("grpc_method",),
            registry=registry,
        )


def _reason(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The ErrorInfo reason of the status the call ended with, or ''."""
    try:
        trailing = context.trailing_metadata() or ()
    except Exception:
        return ""
    for key, value in trailing:
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return str(info.reason)
    return ""


class MethodCounts:
    """One method's series, their label values resolved once rather than on every call."""

    __slots__ = ("_handled", "_handled_by_code", "_handling", "_method", "_quota_refusals", "_sent", "_started")

    def __init__(self, grpc_metrics: GrpcMetrics, kind: str, method: str) -> None:
        service, name = _split(method)
        self._started = grpc_metrics.started.labels(kind, service, name)
        self._handling = grpc_metrics.handling.labels(kind, service, name)
        # Only a stream counts the messages it sends (a unary call has no series there, as before).
        self._sent = grpc_metrics.msg_sent.labels(kind, service, name) if kind != "unary" else None
        self._handled = grpc_metrics.handled
        self._handled_by_code: dict[grpc.StatusCode, Any] = {}
        self._quota_refusals = grpc_metrics.quota_refusals
        self._method = (kind, service, name)

    def started(self) -> float:
        """Counts a call in; the time to hand to `finished`."""
        self._started.inc()
        return time.perf_counter()

    def sent(self) -> None:
        if self._sent is not None:
            self._sent.inc()

    def finished(self, code: grpc.StatusCode, context: grpc.aio.ServicerContext[Any, Any], start: float) -> None:
        """Counts the call out by the code it ended with, and times it."""
        handled = self._handled_by_code.get(code)
        if handled is None:
            handled = self._handled_by_code[code] = self._handled.labels(*self._method, code.name)
        handled.inc()
        self._handling.observe(time.perf_counter() - start)
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED and _reason(context) == _QUOTA_REASON:
            self._quota_refusals.labels(self._method[2]).inc()


# The phases whose events time placement to vCluster ready.
_PLACED_OR_READY = (phases.PLACEMENT, *phases.CREATE_FROM_VCLUSTER_READY)


class ApiMetrics:
    """The API's own series; gauges read from the database are refreshed by `refresh`, not per request."""

    def __init__(self, registry: CollectorRegistry, store: DeploymentStore, open_watches: Callable[[], int]) -> None:
        self._store = store
        self.grpc = GrpcMetrics(registry)
        self.deployments = Gauge(
            "apphosting_deployments",
            "Live deployments (not deleted) by status and geographic region",
            ("status", "geographic_region"),
            registry=registry,
        )
        self.outbox_backlog = Gauge(
            "apphosting_outbox_backlog", "Outbox rows not yet stored by JetStream", registry=registry
        )
        self.outbox_oldest_age = Gauge(
            "apphosting_outbox_oldest_age_seconds",
            "Age of the oldest outbox row not yet stored by JetStream (0 when empty)",
            registry=registry,
        )
        watches = Gauge(
            "apphosting_watch_streams_open", "WatchDeployment(s) streams open on this replica", registry=registry
        )
        watches.set_function(lambda: float(open_watches()))
        self.create_to_placed = Histogram(
            "apphosting_deployment_create_to_placed_seconds",
            "From a deployment's creation to the scheduler's placement of it",
            buckets=metrics.LIFECYCLE_BUCKETS,
            registry=registry,
        )
        self.placed_to_vcluster_ready = Histogram(
            "apphosting_deployment_placed_to_vcluster_ready_seconds",
            "From a deployment's placement to its vCluster answering",
            buckets=metrics.LIFECYCLE_BUCKETS,
            registry=registry,
        )
        self.create_to_running = Histogram(
            "apphosting_deployment_create_to_running_seconds",
            "From a deployment's creation to its first release running",
            buckets=metrics.LIFECYCLE_BUCKETS,
            registry=registry,
        )
        self.delete_to_gone = Histogram(
            "apphosting_deployment_delete_to_gone_seconds",
            "From a delete request to the end of the deployment's teardown",
            buckets=metrics.LIFECYCLE_BUCKETS,
            registry=registry,
        )
        self._regions: frozenset[str] = frozenset()
        # The vCluster look-ups asked at one moment share one statement on one pooled connection.
        self._vcluster_ready: Batcher[tuple[str, int], datetime | None] = Batcher(self._first_vcluster_ready)

    def known_regions(self, regions: frozenset[str]) -> None:
        self._regions = regions

    async def refresh(self) -> None:
        """One GROUP BY over live deployments and one look at the outbox."""
        async with self._store.engine.connect() as conn:
            rows = (await conn.execute(LIVE_COUNTS)).all()
            backlog, oldest = (await conn.execute(select(func.count(), func.min(OutboxRow.created_at)))).one()
        counts: dict[tuple[str, str], float] = {}
        for status, region, number in rows:
            key = (status, metrics.bounded(region, self._regions))
            counts[key] = counts.get(key, 0) + number
        # Every known pair is set, so a status that emptied reads 0 instead of keeping its last count.
        for status in STATUS_NAMES.values():
            for region in self._regions:
                counts.setdefault((status, region), 0.0)
        for (status, region), count in counts.items():
            self.deployments.labels(status, region).set(count)
        self.outbox_backlog.set(backlog)
        if oldest is not None and oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=UTC)
        self.outbox_oldest_age.set(max(0.0, (datetime.now(UTC) - oldest).total_seconds()) if oldest else 0.0)

    async def applied(self, event: bus_pb2.StatusEvent, change: Change) -> None:
        """Observes the lifecycle durations an applied status event ends, from the record's and the log's times."""
        row = change.row
        at = change.event.time
        if event.phase == phases.PLACEMENT and change.event.status == _PROVISIONING and row.release == 1:
            self.create_to_placed.observe(_seconds(row.created_at, at))
        elif row.release == 1 and (ready := _vcluster_ready_at(event, at)) is not None:
            placed = await self._vcluster_ready.ask((row.id, change.event.revision))
            if placed is not None:
                self.placed_to_vcluster_ready.observe(_seconds(placed, ready))
        if event.release_healthy and change.event.status == _RUNNING and event.release == 1:
            self.create_to_running.observe(_seconds(row.created_at, at))
        if event.final:
            asked = await self._time_of(row.id, EventRow.operation == "delete")
            if asked is not None:
                self.delete_to_gone.observe(_seconds(asked, at))

    async def _first_vcluster_ready(self, asked: Sequence[tuple[str, int]]) -> list[datetime | None]:
        """For each (deployment, revision): its placement time, unless an event before that revision carried
        its vCluster's readiness.

        This runs for every event that reports the vCluster ready, beside the applier: one statement reads
        the placement and vCluster-ready events of all the deployments asked at once, a few rows each."""
        placed: dict[str, datetime] = {}
        ready_at: dict[str, int] = {}
        found = await self._store.phase_events([deployment_id for deployment_id, _ in asked], _PLACED_OR_READY)
        for event in found:
            deployment_id, revision, at = event["deployment_id"], event["revision"], event["time"]
            if event["phase"] == phases.PLACEMENT:
                if deployment_id not in placed or at > placed[deployment_id]:
                    placed[deployment_id] = at
            elif revision < ready_at.get(deployment_id, revision + 1):
                ready_at[deployment_id] = revision
        return [
            None if ready_at.get(deployment_id, revision) < revision else placed.get(deployment_id)
            for deployment_id, revision in asked
        ]

    async def _time_of(self, deployment_id: str, condition: Any) -> datetime | None:
        """The time of the deployment's latest logged event that meets `condition`."""
        async with self._store.engine.connect() as conn:
            found: datetime | None = (
                await conn.execute(
                    select(func.max(EventRow.time)).where(EventRow.deployment_id == deployment_id, condition)
                )
            ).scalar()
        return found


def _vcluster_ready_at(event: bus_pb2.StatusEvent, applied: datetime) -> datetime | None:
    """When the event says the vCluster became ready (its condition's time, else when it was applied), or None."""
    for condition in event.conditions:
        if condition.type == phases.VCLUSTER_READY_CONDITION and condition.status == "True":
            return condition.time.ToDatetime(tzinfo=UTC) if condition.HasField("time") else applied
    return None


def _seconds(start: datetime, end: datetime) -> float:
    if start.tzinfo is None:
        start = start.replace(tzinfo=UTC)
    if end.tzinfo is None:
        end = end.replace(tzinfo=UTC)
    # Clocks of different machines: a placement stamped before its record's creation counts as instant.
    return max(0.0, (end - start).total_seconds())
