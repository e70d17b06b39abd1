"""The gRPC DeploymentService: proto in, validated request to the store, proto out."""

from __future__ import annotations

import functools
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from typing import Any, TypeVar

import grpc

from apphosting import bus, imageupdates, netguard, registry, secrets
from apphosting.locations import LocationConfig
from apphosting.netguard import Resolver
from apphosting.settings import Limits
from apphosting.v1 import bus_pb2, deployments_pb2_grpc
from apphosting.v1 import deployments_pb2 as pb
from services.deployments import errors, operations, paging, secret_env
from services.deployments.auth import LOCAL_USER_ID, Caller, current_caller
from services.deployments.capacity import Capacity
from services.deployments.convert import (
    STATUS_NAMES,
    clear,
    event_to_proto,
    release_to_proto,
    request_to_data,
    row_to_proto,
    secret_entries,
    set_fields,
)
from services.deployments.errors import FieldViolation, ServiceError
from services.deployments.lifecycle import TERMINAL
from services.deployments.quotas import Quotas, Usage, demand_of, demand_of_spec, held
from services.deployments.quotas import check as quota_rules_check
from services.deployments.store import (
    Change,
    DeploymentStore,
    EventInput,
    NameTaken,
    NewDeployment,
    OutboxFn,
    Outgoing,
    Plan,
    RecordMissing,
    RequestIdReused,
    TransitionRejected,
    new_record,
    now,
)
from services.deployments.tables import DeploymentRow, EventRow
from services.deployments.validation import (
    DeploymentSpec,
    SpecInvalid,
    judged_fields,
    validate_create,
    validate_create_resolving,
)
from services.deployments.watch import RESYNC, Watcher, WatchHub

log = logging.getLogger(__name__)

__all__ = ["LOCAL_USER_ID", "DeploymentServicer", "change_of", "placement_outbox"]

Req = TypeVar("Req")
Resp = TypeVar("Resp")


def _answer(method: str, failure: Exception) -> ServiceError:
    """What the caller is told about a failure: never UNKNOWN, never the text of an unexpected exception."""
    if isinstance(failure, ServiceError):
        return failure
    if isinstance(failure, errors.DATABASE_FAILURES):
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
    # The stored hash must not become a way to test guesses of a secret value: names count, values do not.
    for entry in body.secret_environment_variables:
        entry.ClearField("value")
    return hashlib.sha256(body.SerializeToString(deterministic=True)).hexdigest()


# The request that carries out each operation in flight (the resync sends it again when it stalls).
REQUEST_OF: dict[str, bus_pb2.Operation.ValueType] = {
    "update": bus_pb2.OPERATION_UPDATE,
    "scale": bus_pb2.OPERATION_UPDATE,
    "rollback": bus_pb2.OPERATION_UPDATE,
    "stop": bus_pb2.OPERATION_STOP,
    "start": bus_pb2.OPERATION_START,
    "delete": bus_pb2.OPERATION_DELETE,
    "force-delete": bus_pb2.OPERATION_DELETE,
}


# Operations whose jobs deploy no app (a stop scales it to zero; a delete removes it).
_NO_APP_DEPLOYED = frozenset({bus_pb2.OPERATION_STOP, bus_pb2.OPERATION_DELETE})


def placement_outbox(
    operation: bus_pb2.Operation.ValueType, rollout_timeout: float = 0.0
) -> Callable[[DeploymentRow, pb.Deployment], list[Outgoing]]:
    """The scheduler request that carries out an operation, built from the committed record."""

    def build(row: DeploymentRow, deployment: pb.Deployment) -> list[Outgoing]:
        message_id = str(uuid.uuid4())
        kind = operation
        if kind == bus_pb2.OPERATION_CREATE and row.is_adopted:
            kind = bus_pb2.OPERATION_ADOPT
        request = bus_pb2.PlacementRequest(
            request_id=message_id,
            operation=kind,
            deployment=deployment,
            release=row.release,
            rollout_timeout_seconds=rollout_timeout if kind == bus_pb2.OPERATION_UPDATE else 0.0,
            force=row.operation == "force-delete",
            # Only the operations that deploy the app carry its values: no copy travels where none is needed.
            sealed_secrets=secret_env.sealed_for_bus(row.spec) if kind not in _NO_APP_DEPLOYED else [],
        )
        return [Outgoing(bus.PLACEMENT_SUBJECT, request.SerializeToString(), message_id)]

    return build


def _preview(new: NewDeployment) -> pb.Deployment:
    """The Deployment a create would make, as a validate_only answer shows it (no id: nothing exists)."""
    return row_to_proto(new_record(new, now(), id="", cluster_id="", phase="validated", revision=0))


def _prefixed(invalid: SpecInvalid, prefix: str, renames: dict[str, str] | None = None) -> ServiceError:
    """A spec's violations as the fields of the request that carried it (deployment.x, overrides.x)."""
    renames = renames or {}

    def name(field: str) -> str:
        head = field.split(".", 1)[0].split("[", 1)[0]
        return renames[head] + field[len(head) :] if head in renames else prefix + field

    return errors.invalid_argument(FieldViolation(name(v.field), v.description, v.reason) for v in invalid.violations)


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
        locations: Sequence[LocationConfig] = (),
        capacity: Capacity | None = None,
        rollout_timeout: float = 600.0,
        registry_client: registry.RegistryClient | None = None,
        secret_keys: secrets.KeyRing | None = None,
    ) -> None:
        self._store = store
        self._registry = registry_client
        self._secret_keys = secret_keys
        self._locations = {location.id: location for location in locations}
        self._capacity = capacity
        self._rollout_timeout = rollout_timeout
        store.update_outbox = placement_outbox(bus_pb2.OPERATION_UPDATE, rollout_timeout)
        store.delete_outbox = placement_outbox(bus_pb2.OPERATION_DELETE)
        self._hub = hub
        self._limits = limits
        self._regions = frozenset(regions)
        self._announce = announce
        self._quotas = quotas
        # Create-time checks of helm_repo_url hosts go through a cache, so slow DNS cannot stall creates.
        self._resolver = netguard.CachingResolver(resolver or netguard.system_resolver)

    async def _preview_create(self, new: NewDeployment) -> pb.Deployment:
        """What a create would make, written nowhere: quota checked, and where it would be placed and why."""
        if self._quotas is not None and self._quotas.enforced:
            quota_rules_check(self._quotas, await self._store.usage(new.user_id), new.demand)
        preview = _preview(new)
        if self._capacity is None:
            raise errors.unavailable("the scheduler (no bus configured)")
        reply = await self._capacity.ask(bus_pb2.CAPACITY_MODE_EXPLAIN, preview, new.target_location or "")
        preview.placement.CopyFrom(reply.explanation)
        if not reply.fits:
            preview.status = pb.DEPLOYMENT_STATUS_FAILED
            preview.error_message = reply.message or reply.explanation.refusal
        return preview

    def _caller(self, context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
        # Set by the call's gate (services.deployments.calls) for this call; none set is UNAUTHENTICATED.
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
        deployment_id = str(uuid.uuid4())
        try:
            spec = await validate_create_resolving(
                request_to_data(request), limits=self._limits, regions=self._regions, resolver=self._resolver
            )
        except SpecInvalid as invalid:
            found = [FieldViolation(v.field, v.description, v.reason) for v in invalid.violations]
            # The secret entries' faults too, all in one answer (seal raises them with these).
            secret_env.seal(
                request.secret_environment_variables,
                deployment_id=deployment_id,
                ring=self._secret_keys,
                limits=self._limits,
                also=found,
            )
            raise errors.invalid_argument(found) from None
        stored = spec.model_dump(mode="json", exclude_none=True)
        if request.secret_environment_variables:
            stored[secret_env.FIELD] = secret_env.seal(
                request.secret_environment_variables,
                deployment_id=deployment_id,
                ring=self._secret_keys,
                limits=self._limits,
            )
            overlap = secret_env.overlap_violations(stored)
            if overlap:
                raise errors.invalid_argument(overlap)
        new = NewDeployment(
            user_id=user_id,
            name=spec.deployment_name,
            app_type=spec.app_type,
            geographic_region=spec.geographic_region,
            spec=stored,
            request_id=request_id,
            request_hash=_request_hash(request),
            demand=demand_of(spec),
            id=deployment_id,
        )
        if request.validate_only:
            return await self._preview_create(new)
        row, change = await self._create(new)
        # The Deployment the change announced is the record as written: answered as it is.
        return change.deployment if change is not None else row_to_proto(row)

    async def _create(
        self, new: NewDeployment, also: tuple[str, Callable[[DeploymentRow], Plan], OutboxFn | None] | None = None
    ) -> tuple[DeploymentRow, Change | None]:
        """Stores a new deployment (and with `also`, changes another record in the same transaction) and
        announces what changed; None for the change on a request_id replay."""
        try:
            row, change = await self._store.create(
                new, placement_outbox(bus_pb2.OPERATION_CREATE), quotas=self._quotas, also=also
            )
        except NameTaken as taken:
            raise errors.name_taken(new.name, taken.existing_id) from None
        except RequestIdReused:
            raise errors.invalid_field(
                "request_id",
                "request_id was already used for a different request; use a new request_id",
                "REQUEST_ID_REUSED",
            ) from None
        except TransitionRejected as rejected:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "OPERATION_NOT_ALLOWED", str(rejected)) from None
        if change is not None:
            self._announce(change_of(change))
            for other in change.also:
                self._announce(change_of(other))
        return row, change

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
        size = paging.page_size(request.page_size)
        statuses = _statuses(request.statuses, "statuses")
        caller = self._caller(context)
        key = paging.filter_key(caller.user_id, statuses, request.geographic_region, request.show_deleted)
        cursor = paging.position(request.page_token, key)
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
                show_deleted=request.show_deleted,
                before_seq=cursor,
                limit=limit,
            )
            for row in rows:
                if len(response.deployments) == size:
                    full = True
                    break
                # Made in place as the page's last element: appending a finished message copies it.
                item = row_to_proto(row, add_to=response.deployments)
                # The field's tag and length prefix take at most 6 bytes more per row.
                cost = item.ByteSize() + 6
                if len(response.deployments) > 1 and used + cost > paging.MAX_PAGE_BYTES:
                    del response.deployments[-1]
                    full = True
                    break
                used += cost
                cursor = row["seq"]
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
        if request.force and not row.is_adopted:
            raise errors.invalid_field(
                "force", "force applies only to an adopted deployment (its workloads are deleted too)", "NOT_ALLOWED"
            )
        operation = "force-delete" if request.force else "delete"

        def plan(current: DeploymentRow) -> EventInput:
            operations.check_etag(current, request.etag)
            return operations.request_change(
                current,
                operation="delete",
                status="deleting",
                actor=caller.user_id,
                reason="",
                record={"operation": operation},
            )

        if request.validate_only:
            plan(row)
            return row_to_proto(row)
        return await self._mutate(user_id, row, plan, placement_outbox(bus_pb2.OPERATION_DELETE), "DELETE_NOT_ALLOWED")

    @_unary
    async def RetryDeployment(
        self,
        request: pb.RetryDeploymentRequest,
        context: grpc.aio.ServicerContext[pb.RetryDeploymentRequest, pb.Deployment],
    ) -> pb.Deployment:
        caller = self._caller(context)
        user_id = _owner(caller)
        row = await self._get(user_id, request.id)

        def plan(current: DeploymentRow) -> EventInput:
            operations.check_etag(current, request.etag)
            if current.status not in TERMINAL:
                raise ServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "NOT_RETRYABLE",
                    f"only a failed or error deployment can be retried; this one is {current.status}",
                    metadata={"status": current.status},
                )
            return EventInput(
                # One retry per revision: a repeated call for the same failure is the same retry.
                event_id=f"api:{current.id}:retry:{current.revision}",
                status="pending",
                phase="retry_requested",
                message=f"retry requested after {current.status}",
                source="api",
                actor=caller.user_id,
                operation="retry",
                release=current.release,
                record={"operation": None},
            )

        plan(row)
        return await self._mutate(user_id, row, plan, placement_outbox(bus_pb2.OPERATION_CREATE), "NOT_RETRYABLE")

    async def _mutate(
        self,
        user_id: str | None,
        row: DeploymentRow,
        plan: Plan,
        outbox: OutboxFn | None,
        refusal: str,
        *,
        demand: Any = None,
    ) -> pb.Deployment:
        """Applies an operation the caller asked for and sends the request that carries it out."""
        try:
            applied = await self._store.mutate(row.id, user_id, plan, outbox, quotas=self._quotas, demand=demand)
        except TransitionRejected as rejected:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, refusal, str(rejected)) from None
        except RecordMissing:
            raise errors.not_found(row.id) from None
        self._announce(change_of(applied))
        return applied.deployment

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
            # Only what the stream needs of the record is kept: the row (its ORM state and decoded
            # spec, about 5 KiB) would otherwise live as long as the stream.
            last = request.since_revision
            first, revision, deleted = await self._watch_start(user_id, deployment_id, last == 0)
            if first is not None:
                yield first
                del first
                last = revision
                if deleted:
                    return
            elif last > revision:
                raise ServiceError(
                    grpc.StatusCode.OUT_OF_RANGE,
                    "REVISION_IN_FUTURE",
                    f"since_revision {last} is newer than the deployment's revision {revision}",
                    metadata={"revision": str(revision)},
                )
            else:
                async for item in self._replay(deployment_id, last, strict=True):
                    yield item
                    last = item.event.revision
                    if item.event.final:
                        return
                if last < revision:
                    raise _too_old(last, None)
            while True:
                change = await watcher.get()
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

    async def _watch_start(
        self, user_id: str | None, deployment_id: str, from_now: bool
    ) -> tuple[pb.WatchDeploymentResponse | None, int, bool]:
        """A watch's start: its first answer (the deployment as it is) when it starts from now, the
        deployment's revision, and whether it is deleted."""
        row = await self._get(user_id, deployment_id)
        first = pb.WatchDeploymentResponse(deployment=row_to_proto(row)) if from_now else None
        return first, row.revision, row.deleted_at is not None

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
                change = await watcher.get()
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

    # Day-2 operations: each checks, then changes the desired state; workers converge to it.

    async def _spec(
        self,
        data: dict[str, Any],
        prefix: str,
        renames: dict[str, str] | None = None,
        *,
        changed: Collection[str] | None = None,
    ) -> dict[str, Any]:
        """A stored spec made from `data`: validated; its sealed secret values carried over as they are.

        With `changed` (the fields an update sets in a stored, valid spec), only those are judged,
        with the fields the rules pair them with; the others are kept as they are stored.
        """
        data = dict(data)
        sealed = data.pop(secret_env.FIELD, None)
        judged = data if changed is None else {key: data[key] for key in judged_fields(data, changed) if key in data}
        try:
            if changed is not None and "helm_repo_url" not in changed:
                # The stored region was accepted at create; an update does not move it.
                regions = {*self._regions, str(data.get("geographic_region"))}
                spec = validate_create(judged, limits=self._limits, regions=regions)
            else:
                spec = await validate_create_resolving(
                    judged, limits=self._limits, regions=self._regions, resolver=self._resolver
                )
        except SpecInvalid as invalid:
            raise _prefixed(invalid, prefix, renames) from None
        result = spec.model_dump(mode="json", exclude_none=True)
        if changed is not None:
            result = {**{key: value for key, value in data.items() if key not in judged}, **result}
        if sealed:
            result[secret_env.FIELD] = sealed
            overlap = secret_env.overlap_violations(result, prefix)
            if overlap:
                raise errors.invalid_argument(overlap)
        return result

    async def _hold(self, row: DeploymentRow, spec: dict[str, Any], *, validate_only: bool) -> Usage:
        """Quota and capacity for a new spec of a record: checked (validate_only) or held, before anything is written.

        Returns what the record will hold against its owner's quotas.
        """
        demand = demand_of_spec(spec)
        if self._quotas is not None and self._quotas.enforced:
            quota_rules_check(self._quotas, await self._store.usage(row.user_id) - held(row), demand)
        if demand != held(row) and row.location_id and row.status in ("running", "stopped"):
            if self._capacity is None:
                raise errors.unavailable("the scheduler (no bus configured)")
            wanted = row_to_proto(row)
            _apply_spec(wanted, spec)
            await self._capacity.hold(wanted, validate_only=validate_only)
        return demand

    async def _release(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        row: DeploymentRow,
        *,
        operation: str,
        spec: dict[str, Any],
        given_etag: str,
        validate_only: bool,
        reason: str,
        rollback_of: int | None = None,
        images: bool | None = None,
    ) -> pb.Deployment:
        """A new release of `spec`: checked, capacity held, written with the request that rolls it out."""
        caller = self._caller(context)
        user_id = _owner(caller)
        operations.growth_violations(row.spec, spec, "deployment.")

        def plan(current: DeploymentRow) -> EventInput:
            operations.precheck(current, operation, given_etag, release=row.release)
            return operations.release_change(
                current,
                operation=operation,
                spec=spec,
                actor=caller.user_id,
                reason=reason,
                rollback_of=rollback_of,
                images=images,
            )

        change = plan(row)
        demand = await self._hold(row, spec, validate_only=validate_only)
        if validate_only:
            preview = row_to_proto(row)
            _apply_spec(preview, spec)
            preview.release = change.release
            preview.reconciling = bool(change.record.get("operation"))
            preview.operation = change.record.get("operation") or ""
            return preview
        outbox = placement_outbox(bus_pb2.OPERATION_UPDATE, self._rollout_timeout) if row.status == "running" else None
        try:
            return await self._mutate(user_id, row, plan, outbox, "OPERATION_NOT_ALLOWED", demand=demand)
        except BaseException:
            if self._capacity is not None and demand_of_spec(spec) != held(row) and row.location_id:
                current = await self._store.get(None, row.id)
                if current is not None and current.status in ("running", "stopped"):
                    await self._capacity.restore(row_to_proto(current))
            raise

    @_unary
    async def UpdateDeployment(
        self,
        request: pb.UpdateDeploymentRequest,
        context: grpc.aio.ServicerContext[pb.UpdateDeploymentRequest, pb.Deployment],
    ) -> pb.Deployment:
        row = await self._get(_owner(self._caller(context)), request.deployment.id)
        operations.precheck(row, "update", request.etag or request.deployment.etag)
        data = operations.updated_spec(row.spec, request.deployment, request.update_mask)
        if secret_env.FIELD in request.update_mask.paths:
            data[secret_env.FIELD] = secret_env.seal(
                request.deployment.secret_environment_variables,
                deployment_id=row.id,
                ring=self._secret_keys,
                limits=self._limits,
                previous=secret_env.stored(row.spec),
                prefix="deployment.",
                updating=True,
            )
        spec = await self._spec(data, "deployment.", changed=request.update_mask.paths)
        shrunk = operations.growth_violations(row.spec, spec, "deployment.")
        if shrunk:
            raise errors.invalid_argument(shrunk)
        images = True if any(path in operations.IMAGE_POLICY for path in request.update_mask.paths) else None
        return await self._release(
            context,
            row,
            operation="update",
            spec=spec,
            given_etag=request.etag or request.deployment.etag,
            validate_only=request.validate_only,
            reason=request.reason,
            images=images,
        )

    @_unary
    async def ScaleDeployment(
        self,
        request: pb.ScaleDeploymentRequest,
        context: grpc.aio.ServicerContext[pb.ScaleDeploymentRequest, pb.Deployment],
    ) -> pb.Deployment:
        row = await self._get(_owner(self._caller(context)), request.id)
        operations.precheck(row, "scale", request.etag)
        spec = await self._spec({**row.spec, "replicas": request.replicas}, "", changed=("replicas",))
        return await self._release(
            context,
            row,
            operation="scale",
            spec=spec,
            given_etag=request.etag,
            validate_only=request.validate_only,
            reason=request.reason,
        )

    @_unary
    async def RollbackDeployment(
        self,
        request: pb.RollbackDeploymentRequest,
        context: grpc.aio.ServicerContext[pb.RollbackDeploymentRequest, pb.Deployment],
    ) -> pb.Deployment:
        row = await self._get(_owner(self._caller(context)), request.id)
        operations.precheck(row, "rollback", request.etag)
        if request.release < 0:
            raise errors.invalid_field("release", "release must be 0 (the last healthy one) or a release number")
        if request.release == 0:
            target = await self._store.last_healthy_release(row.id, row.release)
            if target is None:
                raise ServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "NO_HEALTHY_RELEASE",
                    f"no release before the current one ({row.release}) ran healthy; name the release to go back to",
                )
        else:
            if request.release == row.release:
                raise errors.invalid_field(
                    "release", f"release {row.release} is the current one; name an earlier release", "NOT_ALLOWED"
                )
            found = await self._store.release(row.id, request.release)
            if found is None:
                raise errors.invalid_field(
                    "release",
                    f"release {request.release} does not exist; this deployment has releases 1 to {row.release}",
                    "NOT_FOUND",
                )
            target = found
        return await self._release(
            context,
            row,
            operation="rollback",
            spec=dict(target.spec or {}),
            given_etag=request.etag,
            validate_only=request.validate_only,
            reason=request.reason,
            rollback_of=target.number,
            images=False,
        )

    @_unary
    async def StopDeployment(
        self,
        request: pb.StopDeploymentRequest,
        context: grpc.aio.ServicerContext[pb.StopDeploymentRequest, pb.Deployment],
    ) -> pb.Deployment:
        caller = self._caller(context)
        row = await self._get(_owner(caller), request.id)

        def plan(current: DeploymentRow) -> EventInput:
            operations.precheck(current, "stop", request.etag)
            return operations.request_change(
                current, operation="stop", status="running", actor=caller.user_id, reason=request.reason
            )

        plan(row)
        if request.validate_only:
            return row_to_proto(row)
        return await self._mutate(_owner(caller), row, plan, placement_outbox(bus_pb2.OPERATION_STOP), "NOT_ALLOWED")

    @_unary
    async def StartDeployment(
        self,
        request: pb.StartDeploymentRequest,
        context: grpc.aio.ServicerContext[pb.StartDeploymentRequest, pb.Deployment],
    ) -> pb.Deployment:
        caller = self._caller(context)
        row = await self._get(_owner(caller), request.id)

        def plan(current: DeploymentRow) -> EventInput:
            operations.precheck(current, "start", request.etag)
            return operations.request_change(
                current,
                operation="start",
                status="provisioning",
                actor=caller.user_id,
                reason=request.reason,
                record={"error_message": None},
            )

        plan(row)
        if self._capacity is None:
            raise errors.unavailable("the scheduler (no bus configured)")
        # Running again needs its cpu and memory back on its location.
        wanted = row_to_proto(row)
        wanted.status = pb.DEPLOYMENT_STATUS_RUNNING
        mode = bus_pb2.CAPACITY_MODE_CHECK if request.validate_only else bus_pb2.CAPACITY_MODE_RESERVE
        reply = await self._capacity.ask(mode, wanted)
        if not reply.fits:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "CAPACITY_EXCEEDED",
                f"location {row.location_id} has no room to start it again: {reply.message}; "
                "promote it with delete_source to migrate it to a location with room",
                metadata={"location_id": row.location_id or ""},
            )
        if request.validate_only:
            return row_to_proto(row)
        try:
            return await self._mutate(
                _owner(caller), row, plan, placement_outbox(bus_pb2.OPERATION_START), "NOT_ALLOWED"
            )
        except BaseException:
            current = await self._store.get(None, row.id)
            if current is not None and current.status == "stopped":
                await self._capacity.restore(row_to_proto(current))
            raise

    @_unary
    async def PromoteDeployment(
        self,
        request: pb.PromoteDeploymentRequest,
        context: grpc.aio.ServicerContext[pb.PromoteDeploymentRequest, pb.PromoteDeploymentResponse],
    ) -> pb.PromoteDeploymentResponse:
        caller = self._caller(context)
        user_id = _owner(caller)
        source = await self._get(user_id, request.id)
        operation = "migrate" if request.delete_source else "promote"
        operations.precheck(source, "promote", request.etag)
        location, region = self._promote_target(request, source)
        overrides = request.overrides
        data = dict(source.spec)
        data["geographic_region"] = region
        data["deployment_name"] = request.new_name or (
            overrides.name if overrides.HasField("name") else f"{source.name}-copy"
        )
        data.update(set_fields(overrides, (n for n in operations.UPDATABLE if n not in _REPEATED_OR_STRUCT)))
        spec = await self._spec(
            data, "overrides.", {"deployment_name": "new_name", "geographic_region": "target_geographic_region"}
        )
        copy_id = str(uuid.uuid4())
        spec = secret_env.resealed(spec, source.id, copy_id, self._secret_keys)
        request_id = _parse_id(request.request_id, "request_id") if request.request_id else None
        body = pb.PromoteDeploymentRequest()
        body.CopyFrom(request)
        body.ClearField("request_id")
        body.ClearField("validate_only")
        new = NewDeployment(
            user_id=caller.user_id if user_id is not None else source.user_id,
            name=spec["deployment_name"],
            app_type=spec["app_type"],
            geographic_region=spec["geographic_region"],
            spec=spec,
            request_id=request_id,
            request_hash=hashlib.sha256(body.SerializeToString(deterministic=True)).hexdigest(),
            demand=demand_of_spec(spec),
            made_by="promote",
            reason=f"{operation} of {source.id} ({source.name}) release {source.release}",
            target_location=location,
            promoted_from=source.id,
            id=copy_id,
        )
        if request.validate_only:
            return pb.PromoteDeploymentResponse(source=row_to_proto(source), target=await self._preview_create(new))

        def make_plan(copy: DeploymentRow) -> Plan:
            def plan(current: DeploymentRow) -> EventInput:
                operations.precheck(current, "promote", request.etag)
                change = operations.request_change(
                    current,
                    operation=operation,
                    status="migrating" if request.delete_source else "promoting",
                    actor=caller.user_id,
                    reason=f"copy {copy.id} ({copy.name})",
                    record={"promoted_to": copy.id},
                )
                return change

            return plan

        row, event = await self._create(new, also=(source.id, make_plan, None))
        if event is None:
            current = await self._get(user_id, source.id)
            return pb.PromoteDeploymentResponse(source=row_to_proto(current), target=row_to_proto(row))
        return pb.PromoteDeploymentResponse(source=event.also[0].deployment, target=event.deployment)

    def _promote_target(self, request: pb.PromoteDeploymentRequest, source: DeploymentRow) -> tuple[str | None, str]:
        """The location (None: any) and geographic region of a promote's copy."""
        named = [
            (f, v)
            for f, v in (("target_location", request.target_location), ("target_cluster_id", request.target_cluster_id))
            if v
        ]
        if len(named) == 2 and named[0][1] != named[1][1]:
            raise errors.invalid_field(
                "target_cluster_id", "target_location and target_cluster_id name the same thing; give one", "CONFLICT"
            )
        region = request.target_geographic_region or source.geographic_region
        if not named:
            if request.target_geographic_region and request.target_geographic_region not in self._regions:
                raise errors.invalid_field(
                    "target_geographic_region",
                    f"target_geographic_region {errors.echo(request.target_geographic_region)} is not served here "
                    f"(known: {', '.join(sorted(self._regions))})",
                    "NOT_FOUND",
                )
            return None, region
        field, location_id = named[0]
        location = self._locations.get(location_id)
        if location is None:
            raise errors.invalid_field(
                field, f"{field} {errors.echo(location_id)} is not a known location", "NOT_FOUND"
            )
        if request.target_geographic_region and request.target_geographic_region != location.geographic_region:
            raise errors.invalid_field(
                "target_geographic_region",
                f"location {location.id} is in {location.geographic_region}, not {request.target_geographic_region}",
                "CONFLICT",
            )
        return location.id, location.geographic_region

    @_unary
    async def AdoptDeployment(
        self,
        request: pb.AdoptDeploymentRequest,
        context: grpc.aio.ServicerContext[pb.AdoptDeploymentRequest, pb.Deployment],
    ) -> pb.Deployment:
        caller = self._caller(context)
        violations = operations.adopt_violations(request.source_namespace, request.location, self._locations)
        if violations:
            raise errors.invalid_argument(violations)
        location = self._locations[request.location]
        data: dict[str, Any] = {
            "geographic_region": location.geographic_region,
            "deployment_name": request.deployment_name or request.source_namespace,
            "app_type": request.app_type if request.HasField("app_type") else "container",
        }
        for name in (
            "cpu_request",
            "memory_request_mb",
            "replicas",
            "container_port",
            "docker_image",
            "storage_size_gb",
        ):
            if request.HasField(name):
                data[name] = getattr(request, name)
        try:
            spec = (
                await validate_create_resolving(
                    data, limits=self._limits, regions=self._regions, resolver=self._resolver
                )
            ).model_dump(mode="json", exclude_none=True)
        except SpecInvalid as invalid:
            # What runs in the namespace is already there: an adopted deployment needs no image or chart.
            kept = [
                v
                for v in invalid.violations
                if not (v.reason == "REQUIRED" and v.field in ("docker_image", "helm_repo_url", "helm_chart_name"))
            ]
            if kept:
                raise errors.invalid_argument(FieldViolation(v.field, v.description, v.reason) for v in kept) from None
            spec = DeploymentSpec.model_construct(**data).model_dump(mode="json", exclude_none=True)
        holder = await self._store.adopted(location.id, request.source_namespace)
        if holder is not None:
            raise ServiceError(
                grpc.StatusCode.ALREADY_EXISTS,
                "ALREADY_ADOPTED",
                f"namespace {request.source_namespace} on {location.id} is already adopted by deployment {holder}",
                metadata={"id": holder},
            )
        body = pb.AdoptDeploymentRequest()
        body.CopyFrom(request)
        body.ClearField("request_id")
        body.ClearField("validate_only")
        new = NewDeployment(
            user_id=caller.user_id,
            name=spec["deployment_name"],
            app_type=spec["app_type"],
            geographic_region=spec["geographic_region"],
            spec=spec,
            request_id=_parse_id(request.request_id, "request_id") if request.request_id else None,
            request_hash=hashlib.sha256(body.SerializeToString(deterministic=True)).hexdigest(),
            demand=demand_of_spec(spec),
            made_by="adopt",
            reason=f"adopted namespace {request.source_namespace} on {location.id}",
            target_location=location.id,
            is_adopted=True,
            source_namespace=request.source_namespace,
        )
        if request.validate_only:
            return await self._preview_create(new)
        row, change = await self._create(new)
        # The Deployment the change announced is the record as written: answered as it is.
        return change.deployment if change is not None else row_to_proto(row)

    @_unary
    async def ListReleases(
        self,
        request: pb.ListReleasesRequest,
        context: grpc.aio.ServicerContext[pb.ListReleasesRequest, pb.ListReleasesResponse],
    ) -> pb.ListReleasesResponse:
        caller = self._caller(context)
        row = await self._get(_owner(caller), request.id)
        size = paging.page_size(request.page_size)
        key = paging.filter_key(caller.user_id, ["releases"], row.id)
        before = paging.position(request.page_token, key)
        rows = await self._store.releases(row.id, before=before, limit=size + 1)
        response = pb.ListReleasesResponse(releases=[release_to_proto(release) for release in rows[:size]])
        if len(rows) > size:
            response.next_page_token = paging.encode(rows[size - 1].number, key)
        return response

    @_unary
    async def PreviewImageUpdate(
        self,
        request: pb.PreviewImageUpdateRequest,
        context: grpc.aio.ServicerContext[pb.PreviewImageUpdateRequest, pb.PreviewImageUpdateResponse],
    ) -> pb.PreviewImageUpdateResponse:
        row = await self._get(_owner(self._caller(context)), request.id)
        spec = row.spec
        docker_image = spec.get("docker_image")
        if not docker_image:
            raise errors.image_policy_unusable("docker_image", "the deployment has no docker_image to update")
        if not spec.get("image_update_strategy"):
            raise errors.image_policy_unusable(
                "image_update_strategy", "the deployment has no image update strategy; set one with an update"
            )
        target = imageupdates.Target(
            docker_image,
            spec.get("image_update_strategy"),
            spec.get("image_update_constraint"),
            spec.get("image_allow_tags"),
            spec.get("image_ignore_tags"),
            paused=row.image_updates_paused,
        )
        try:
            policy = imageupdates.policy_of(target)
        except imageupdates.PolicyUnusable as unusable:
            raise errors.image_policy_unusable(unusable.field, str(unusable)) from None
        try:
            reference = target.reference
        except ValueError as invalid:
            raise errors.image_policy_unusable("docker_image", str(invalid)) from None
        if self._registry is None:
            raise errors.unavailable("the registry client (not configured)")
        backoff = self._registry.backoff
        if not backoff.allowed(reference.registry):
            # Not asked again before its backoff ends: the answer is the failure that started it.
            wait = backoff.next_allowed(reference.registry) - time.monotonic()
            last = backoff.last_error(reference.registry)
            failure = last or registry.RegistryUnavailable(reference.registry, "backing off after errors")
            raise errors.registry_failure(docker_image, failure, wait)
        try:
            snapshot = await imageupdates.fetch_snapshot(
                self._registry, reference.registry, reference.repository, [policy]
            )
        except registry.RegistryError as failure:
            raise errors.registry_failure(docker_image, failure) from None
        plan = imageupdates.plan(target, policy, snapshot)
        answer = pb.PreviewImageUpdateResponse(
            deployment_id=row.id,
            repository=plan.repository,
            strategy=plan.strategy.value,
            constraint=spec.get("image_update_constraint"),
            allow_tags=spec.get("image_allow_tags"),
            ignore_tags=spec.get("image_ignore_tags"),
            current_tag=plan.current_tag,
            current_digest=plan.current_digest,
            winner=plan.winner,
            winner_digest=plan.winner_digest,
            reason=plan.reason,
            would_update=plan.would_update,
            paused=plan.paused,
            new_docker_image=plan.new_docker_image,
            new_release=row.release + 1 if plan.would_update else 0,
        )
        for verdict in plan.verdicts:
            candidate = answer.candidates.add(
                tag=verdict.candidate.tag,
                kept=verdict.kept,
                excluded_by=verdict.excluded.value if verdict.excluded is not None else "",
                detail=verdict.reason,
                digest=verdict.candidate.digest or "",
            )
            if verdict.candidate.created is not None:
                candidate.created.FromDatetime(verdict.candidate.created)
        return answer


# Spec fields that set_fields reads by their own rules, not as optional scalars.
_REPEATED_OR_STRUCT = frozenset({"config", "environment_variables", "secret_environment_variables", "volumes"})


def _apply_spec(message: pb.Deployment, spec: dict[str, Any]) -> None:
    """Puts a spec's fields on a Deployment (what it would be with that release)."""
    for name in operations.UPDATABLE:
        clear(message, name)
    for name in operations.UPDATABLE:
        value = spec.get(name)
        if value is None:
            continue
        if name == "config":
            message.config.update(value)
        elif name == "environment_variables":
            message.environment_variables.extend(value)
        elif name == "secret_environment_variables":
            message.secret_environment_variables.extend(secret_entries(spec))
        elif name == "volumes":
            for volume in value:
                entry = message.volumes.add(path=volume["path"], size_gb=volume["size_gb"])
                if volume.get("purpose") is not None:
                    entry.purpose = volume["purpose"]
        else:
            setattr(message, name, value)
