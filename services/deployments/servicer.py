"""The gRPC DeploymentService: proto in, validated request to the store, proto out."""

from __future__ import annotations

import functools
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from typing import Any, TypeVar

import grpc
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from apphosting import bus, netguard
from apphosting.netguard import Resolver
from apphosting.settings import Limits
from apphosting.v1 import bus_pb2, deployments_pb2_grpc
from apphosting.v1 import deployments_pb2 as pb
from services.deployments import errors, paging
from services.deployments.auth import LOCAL_USER_ID, Caller, current_caller
from services.deployments.convert import STATUS_NAMES, event_to_proto, request_to_data, row_to_proto
from services.deployments.errors import FieldViolation, ServiceError
from services.deployments.lifecycle import TERMINAL
from services.deployments.quotas import Quotas, demand_of
from services.deployments.store import (
    Change,
    DeploymentStore,
    EventInput,
    NameTaken,
    NewDeployment,
    Outgoing,
    RequestIdReused,
    TransitionRejected,
)
from services.deployments.tables import DeploymentRow, EventRow
from services.deployments.validation import SpecInvalid, validate_create_resolving
from services.deployments.watch import RESYNC, Watcher, WatchHub

log = logging.getLogger(__name__)

__all__ = ["LOCAL_USER_ID", "DeploymentServicer", "change_of", "placement_outbox"]

Req = TypeVar("Req")
Resp = TypeVar("Resp")


def _answer(method: str, failure: Exception) -> ServiceError:
    """What the caller is told about a failure: never UNKNOWN, never the text of an unexpected exception."""
    if isinstance(failure, ServiceError):
        return failure
    if isinstance(failure, (OperationalError, DBAPIError, PoolTimeout, OSError)):
        log.warning("database unavailable in %s: %s", method, failure)
        return errors.unavailable("the database")
    return errors.internal(method, failure)


def _unary(
    method: Callable[[DeploymentServicer, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]],
) -> Callable[[DeploymentServicer, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]:
    @functools.wraps(method)
    async def wrapper(self: DeploymentServicer, request: Req, context: grpc.aio.ServicerContext[Req, Resp]) -> Resp:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as failure:
            await context.abort_with_status(_answer(method.__name__, failure).to_status())
        raise AssertionError("abort_with_status returned")

    return wrapper


def _streaming(
    method: Callable[[DeploymentServicer, Req, grpc.aio.ServicerContext[Req, Resp]], AsyncIterator[Resp]],
) -> Callable[[DeploymentServicer, Req, grpc.aio.ServicerContext[Req, Resp]], AsyncIterator[Resp]]:
    @functools.wraps(method)
    async def wrapper(
        self: DeploymentServicer, request: Req, context: grpc.aio.ServicerContext[Req, Resp]
    ) -> AsyncIterator[Resp]:
        try:
            async for item in method(self, request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as failure:
            await context.abort_with_status(_answer(method.__name__, failure).to_status())

    return wrapper


def _owner(caller: Caller) -> str | None:
    """Whose deployments the caller may see: their own, or (None) everyone's for an admin.

    Another user's deployment is then simply not found, with the very answer an unknown id gets.
    """
    return None if caller.admin else caller.user_id


def _parse_id(value: str, field: str = "id") -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise errors.invalid_field(
            field, f"{field} must be a deployment UUID such as 3f1c…-…; got {errors.echo(value)}", "INVALID_FORMAT"
        ) from None


def _statuses(values: Sequence[int], field: str) -> list[str]:
    names = []
    for index, value in enumerate(values):
        if value not in STATUS_NAMES:
            raise errors.invalid_field(f"{field}[{index}]", "must be a DeploymentStatus other than UNSPECIFIED")
        names.append(STATUS_NAMES[value])
    return names


def _request_hash(request: pb.CreateAppHostingDeploymentRequest) -> str:
    body = pb.CreateAppHostingDeploymentRequest()
    body.CopyFrom(request)
    body.ClearField("request_id")
    return hashlib.sha256(body.SerializeToString(deterministic=True)).hexdigest()


def placement_outbox(operation: bus_pb2.Operation.ValueType) -> Callable[[DeploymentRow], list[Outgoing]]:
    """The scheduler request that announces a create or a delete, built from the committed record."""

    def build(row: DeploymentRow) -> list[Outgoing]:
        message_id = str(uuid.uuid4())
        request = bus_pb2.PlacementRequest(request_id=message_id, operation=operation, deployment=row_to_proto(row))
        return [Outgoing(bus.PLACEMENT_SUBJECT, request.SerializeToString(), message_id)]

    return build


def change_of(change: Change) -> pb.WatchDeploymentsResponse:
    """The announcement of an applied change: the deployment exactly as that change left it."""
    return pb.WatchDeploymentsResponse(deployment=change.deployment, event=event_to_proto(change.event))


def _from_log(event: EventRow, deployment: pb.Deployment) -> pb.WatchDeploymentResponse:
    return pb.WatchDeploymentResponse(deployment=deployment, event=event_to_proto(event))


def _shutting_down(revision: int | None) -> ServiceError:
    """How a watch ends when its replica stops: UNAVAILABLE, with the revision to resume after."""
    resume = f"; watch again with since_revision={revision}" if revision is not None else ""
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        "SHUTTING_DOWN",
        f"this API replica is shutting down{resume}",
        metadata={"revision": str(revision)} if revision is not None else {},
    )


def _too_old(revision: int, oldest: int | None) -> ServiceError:
    kept = f" (oldest kept: {oldest})" if oldest is not None else ""
    return ServiceError(
        grpc.StatusCode.OUT_OF_RANGE,
        "REVISION_TOO_OLD",
        f"revision {revision} is older than the kept history{kept}; "
        "watch again with since_revision 0 to get the current state",
        metadata={"revision": str(revision)},
    )


class DeploymentServicer(deployments_pb2_grpc.DeploymentServiceServicer):
    """Thin: each RPC validates, calls the store and converts; the store keeps the invariants."""

    def __init__(
        self,
        store: DeploymentStore,
        hub: WatchHub,
        *,
        limits: Limits,
        regions: Collection[str],
        announce: Callable[[pb.WatchDeploymentsResponse], None],
        quotas: Quotas | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        self._store = store
        self._hub = hub
        self._limits = limits
        self._regions = frozenset(regions)
        self._announce = announce
        self._quotas = quotas
        # Create-time checks of helm_repo_url hosts go through a cache, so slow DNS cannot stall creates.
        self._resolver = netguard.CachingResolver(resolver or netguard.system_resolver)

    def _caller(self, context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
        # Set by the AuthInterceptor for this call; none set is UNAUTHENTICATED.
        return current_caller()

    @_unary
    async def CreateAppHostingDeployment(
        self,
        request: pb.CreateAppHostingDeploymentRequest,
        context: grpc.aio.ServicerContext[pb.CreateAppHostingDeploymentRequest, pb.Deployment],
    ) -> pb.Deployment:
        user_id = self._caller(context).user_id
        request_id = None
        if request.request_id:
            request_id = _parse_id(request.request_id, "request_id")
        try:
            spec = await validate_create_resolving(
                request_to_data(request), limits=self._limits, regions=self._regions, resolver=self._resolver
            )
        except SpecInvalid as invalid:
            raise errors.invalid_argument(
                FieldViolation(v.field, v.description, v.reason) for v in invalid.violations
            ) from None
        new = NewDeployment(
            user_id=user_id,
            name=spec.deployment_name,
            app_type=spec.app_type,
            geographic_region=spec.geographic_region,
            spec=spec.model_dump(mode="json", exclude_none=True),
            request_id=request_id,
            request_hash=_request_hash(request),
            demand=demand_of(spec),
        )
        try:
            row, event = await self._store.create(new, placement_outbox(bus_pb2.OPERATION_CREATE), quotas=self._quotas)
        except NameTaken as taken:
            raise errors.name_taken(spec.deployment_name, taken.existing_id) from None
        except RequestIdReused:
            raise errors.invalid_field(
                "request_id",
                "request_id was already used for a different request; use a new request_id",
                "REQUEST_ID_REUSED",
            ) from None
        if event is not None:
            self._announce(change_of(event))
        return row_to_proto(row)

    @_unary
    async def GetDeployment(
        self,
        request: pb.GetDeploymentRequest,
        context: grpc.aio.ServicerContext[pb.GetDeploymentRequest, pb.Deployment],
    ) -> pb.Deployment:
        return row_to_proto(await self._get(_owner(self._caller(context)), request.id))

    async def _get(self, user_id: str | None, raw_id: str) -> DeploymentRow:
        deployment_id = _parse_id(raw_id)
        row = await self._store.get(user_id, deployment_id)
        if row is None:
            raise errors.not_found(deployment_id)
        return row

    @_unary
    async def ListDeployments(
        self,
        request: pb.ListDeploymentsRequest,
        context: grpc.aio.ServicerContext[pb.ListDeploymentsRequest, pb.ListDeploymentsResponse],
    ) -> pb.ListDeploymentsResponse:
        if request.page_size < 0:
            raise errors.invalid_field("page_size", "page_size must be 0 (the default, 50) or more", "OUT_OF_RANGE")
        size = min(request.page_size or paging.DEFAULT_PAGE_SIZE, paging.MAX_PAGE_SIZE)
        statuses = _statuses(request.statuses, "statuses")
        caller = self._caller(context)
        key = paging.filter_key(caller.user_id, statuses, request.geographic_region)
        cursor = None
        if request.page_token:
            try:
                cursor = paging.decode(request.page_token, key)
            except paging.BadToken as bad:
                raise errors.invalid_field("page_token", str(bad), "INVALID_PAGE_TOKEN") from None
        response = pb.ListDeploymentsResponse()
        used = 0
        full = False
        # Rows are read in batches: a page that the byte bound ends early reads few rows past its end.
        while not full:
            limit = min(size - len(response.deployments), paging.DEFAULT_PAGE_SIZE) + 1
            rows = await self._store.page(
                _owner(caller),
                statuses=statuses,
                geographic_region=request.geographic_region,
                before_seq=cursor,
                limit=limit,
            )
            for row in rows:
                item = row_to_proto(row)
                # The field's tag and length prefix take at most 6 bytes more per row.
                cost = item.ByteSize() + 6
                full = len(response.deployments) == size or (
                    len(response.deployments) > 0 and used + cost > paging.MAX_PAGE_BYTES
                )
                if full:
                    break
                response.deployments.append(item)
                used += cost
                cursor = row.seq
            if len(rows) < limit:
                break
        if full and cursor is not None:
            response.next_page_token = paging.encode(cursor, key)
        return response

    @_unary
    async def DeleteDeployment(
        self,
        request: pb.DeleteDeploymentRequest,
        context: grpc.aio.ServicerContext[pb.DeleteDeploymentRequest, pb.Deployment],
    ) -> pb.Deployment:
        caller = self._caller(context)
        user_id = _owner(caller)
        row = await self._get(user_id, request.id)
        if row.status == "deleting" or row.deleted_at is not None:
            return row_to_proto(row)
        change = EventInput(
            event_id=f"api:{row.id}:delete",
            status="deleting",
            phase="delete_requested",
            message="deletion requested",
            source="api",
            actor=caller.user_id,
        )
        return await self._request(user_id, row, change, bus_pb2.OPERATION_DELETE, "DELETE_NOT_ALLOWED")

    @_unary
    async def RetryDeployment(
        self,
        request: pb.RetryDeploymentRequest,
        context: grpc.aio.ServicerContext[pb.RetryDeploymentRequest, pb.Deployment],
    ) -> pb.Deployment:
        caller = self._caller(context)
        user_id = _owner(caller)
        row = await self._get(user_id, request.id)
        if row.status not in TERMINAL:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "NOT_RETRYABLE",
                f"only a failed or error deployment can be retried; this one is {row.status}",
                metadata={"status": row.status},
            )
        change = EventInput(
            # One retry per revision: a repeated call for the same failure is the same retry.
            event_id=f"api:{row.id}:retry:{row.revision}",
            status="pending",
            phase="retry_requested",
            message=f"retry requested after {row.status}",
            source="api",
            actor=caller.user_id,
        )
        return await self._request(user_id, row, change, bus_pb2.OPERATION_CREATE, "NOT_RETRYABLE")

    async def _request(
        self,
        user_id: str | None,
        row: DeploymentRow,
        change: EventInput,
        operation: bus_pb2.Operation.ValueType,
        refusal: str,
    ) -> pb.Deployment:
        """Applies a change the caller asked for and sends the scheduler the request that carries it out."""
        try:
            applied = await self._store.apply(row.id, change, placement_outbox(operation), user_id=user_id)
        except TransitionRejected as rejected:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, refusal, str(rejected)) from None
        if applied is None:
            return row_to_proto(await self._get(user_id, row.id))
        self._announce(change_of(applied))
        return row_to_proto(applied.row)

    @_streaming
    async def WatchDeployment(
        self,
        request: pb.WatchDeploymentRequest,
        context: grpc.aio.ServicerContext[pb.WatchDeploymentRequest, pb.WatchDeploymentResponse],
    ) -> AsyncIterator[pb.WatchDeploymentResponse]:
        user_id = _owner(self._caller(context))
        deployment_id = _parse_id(request.id)
        if request.since_revision < 0:
            raise errors.invalid_field("since_revision", "since_revision must be 0 or a revision already seen")
        # Listen first, then read: a change that lands in between is queued, not missed.
        with self._hub.watch(Watcher(user_id=user_id, deployment_id=deployment_id)) as watcher:
            row = await self._get(user_id, deployment_id)
            last = request.since_revision
            if last == 0:
                yield pb.WatchDeploymentResponse(deployment=row_to_proto(row))
                last = row.revision
                if row.deleted_at is not None:
                    return
            elif last > row.revision:
                raise ServiceError(
                    grpc.StatusCode.OUT_OF_RANGE,
                    "REVISION_IN_FUTURE",
                    f"since_revision {last} is newer than the deployment's revision {row.revision}",
                    metadata={"revision": str(row.revision)},
                )
            else:
                async for item in self._replay(deployment_id, last, strict=True):
                    yield item
                    last = item.event.revision
                    if item.event.final:
                        return
                if last < row.revision:
                    raise _too_old(last, None)
            while True:
                change = await watcher.queue.get()
                if self._hub.closing:
                    raise _shutting_down(last)
                if change is not RESYNC and change.event.revision == last + 1:
                    yield pb.WatchDeploymentResponse(deployment=change.deployment, event=change.event)
                    last = change.event.revision
                    if change.event.final:
                        return
                elif change is RESYNC or change.event.revision > last + 1:
                    async for item in self._replay(deployment_id, last, strict=False):
                        yield item
                        last = item.event.revision
                        if item.event.final:
                            return

    async def _replay(
        self, deployment_id: str, after: int, *, strict: bool
    ) -> AsyncIterator[pb.WatchDeploymentResponse]:
        """The logged changes after a revision; with strict, a gap (history trimmed) is an error."""
        while True:
            history = await self._store.history_after(deployment_id, after)
            if not history:
                return
            if strict and history[0][0].revision != after + 1:
                raise _too_old(after, history[0][0].revision)
            strict = True
            for event, deployment in history:
                yield _from_log(event, deployment)
                after = event.revision

    @_streaming
    async def WatchDeployments(
        self,
        request: pb.WatchDeploymentsRequest,
        context: grpc.aio.ServicerContext[pb.WatchDeploymentsRequest, pb.WatchDeploymentsResponse],
    ) -> AsyncIterator[pb.WatchDeploymentsResponse]:
        _statuses(request.statuses, "statuses")
        watcher = Watcher(
            user_id=_owner(self._caller(context)),
            statuses=frozenset(request.statuses),
            geographic_region=request.geographic_region,
        )
        seen: dict[str, int] = {}
        with self._hub.watch(watcher):
            while True:
                change = await watcher.queue.get()
                if self._hub.closing:
                    raise _shutting_down(None)
                if change is RESYNC:
                    raise ServiceError(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        "WATCH_TOO_SLOW",
                        "the stream fell too far behind; list the deployments and watch again",
                    )
                key = change.deployment.id
                if change.event.revision <= seen.get(key, 0):
                    continue
                seen[key] = change.event.revision
                yield change
