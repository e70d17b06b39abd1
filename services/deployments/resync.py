"""The resync: drives again a deployment whose request or job was lost, or ends it in error naming the step."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from sqlalchemy import func, or_, select

from apphosting import bus
from apphosting.v1 import bus_pb2
from services.deployments.convert import STATUSES
from services.deployments.servicer import REQUEST_OF, placement_outbox
from services.deployments.store import Change, DeploymentStore, EventInput, OutboxFn, Outgoing, TransitionRejected
from services.deployments.tables import DeploymentRow, EventRow

log = logging.getLogger(__name__)

SOURCE = "api/resync"
# The statuses a worker is expected to move on from by itself; the operation that moves each on.
_TRANSIENT: dict[str, bus_pb2.Operation.ValueType] = {
    "pending": bus_pb2.OPERATION_CREATE,
    "provisioning": bus_pb2.OPERATION_CREATE,
    "deleting": bus_pb2.OPERATION_DELETE,
}
# The namespace of the message ids of the events the resync publishes.
_IDS = uuid.UUID("3f0c5a52-8a37-4f8e-9a0e-6a1d4c1b7e90")
# Most deployments looked at in one pass; the rest wait for the next.
_PASS = 100


def redrive_id(row: DeploymentRow) -> str:
    """One re-drive per revision: replicas that find the same stuck record at once apply it once."""
    return f"api:{row.id}:redrive:{row.revision}"


def _redrive_prefix(deployment_id: str) -> str:
    return f"api:{deployment_id}:redrive:"


def _stuck_id(row: DeploymentRow) -> str:
    return f"api:{row.id}:stuck:{row.revision}"


class Resync:
    """Compares each transient deployment's record with its progress, and drives again what stalled.

    Level-triggered: it needs no message to act, so a request or job that was lost, dead-lettered
    after its last delivery, or dropped by a crashed worker is sent again, and a deployment that
    keeps stalling ends in `error` instead of staying in progress for ever.
    """

    def __init__(
        self,
        store: DeploymentStore,
        *,
        on_applied: Callable[[Change], None],
        stuck_after: float,
        max_redrives: int,
        ready: Callable[[], bool] = lambda: True,
        rollout_timeout: float = 600.0,
    ) -> None:
        if stuck_after <= 0 or max_redrives < 0:
            raise ValueError("stuck_after must be positive and max_redrives at least 0")
        self._store = store
        self._on_applied = on_applied
        self._stuck_after = timedelta(seconds=stuck_after)
        self._max_redrives = max_redrives
        # False while what a re-drive needs is away (the bus): a request that cannot be sent is not lost.
        self._ready = ready
        self._rollout_timeout = rollout_timeout

    async def run(self, interval: float, stopping: asyncio.Event) -> None:
        """A pass now (start-up), then one every `interval` seconds until stopping is set."""
        while not stopping.is_set():
            if self._ready():
                await self.once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=interval)

    async def once(self) -> int:
        """One pass; returns how many deployments it drove again or ended."""
        acted = 0
        for row in await self._stuck(datetime.now(UTC) - self._stuck_after):
            if await self._resync(row):
                acted += 1
        return acted

    async def dead_letter(self, js: JetStreamContext, advisory: Msg) -> None:
        """Drives again at once the deployment of a message that JetStream stopped delivering.

        `advisory` is JetStream's max-deliveries advisory; the message it names is still in its
        stream, and says which deployment it was for. Every replica hears it; the re-drive's id
        (from the record's revision) makes them apply it once.
        """
        try:
            notice = json.loads(advisory.data)
            stream, seq = notice["stream"], int(notice["stream_seq"])
            parse = _DEPLOYMENT_OF.get(stream)
            if parse is None:
                return
            deployment_id = parse((await js.get_msg(stream, seq)).data or b"")
            row = await self._store.get(None, deployment_id)
        except Exception as exc:
            log.warning("max-deliveries advisory not followed: %s", exc)
            return
        if row is not None and (row.status in _TRANSIENT or row.operation in REQUEST_OF) and row.deleted_at is None:
            log.warning("deployment %s: a message for it was delivered for the last time", row.id)
            await self._resync(row, quiet=f"a {stream} message for it was delivered for the last time")

    async def _stuck(self, cutoff: datetime) -> list[DeploymentRow]:
        query = (
            select(DeploymentRow)
            .where(
                # In progress: placing, building, tearing down, or an operation a worker carries out.
                or_(DeploymentRow.status.in_(list(_TRANSIENT)), DeploymentRow.operation.in_(list(REQUEST_OF))),
                DeploymentRow.deleted_at.is_(None),
                DeploymentRow.updated_at < cutoff,
            )
            .order_by(DeploymentRow.updated_at)
            .limit(_PASS)
        )
        async with self._store.session() as session:
            return list((await session.scalars(query)).all())

    async def _redrives(self, deployment_id: str) -> int:
        """Re-drives since the owner last asked for something (create, retry, delete)."""
        asked = (
            select(func.coalesce(func.max(EventRow.revision), 0))
            .where(EventRow.deployment_id == deployment_id, EventRow.actor.is_not(None))
            .scalar_subquery()
        )
        query = (
            select(func.count())
            .select_from(EventRow)
            .where(
                EventRow.deployment_id == deployment_id,
                EventRow.event_id.like(f"{_redrive_prefix(deployment_id)}%"),
                EventRow.revision > asked,
            )
        )
        async with self._store.session() as session:
            return int(await session.scalar(query) or 0)

    async def _resync(self, row: DeploymentRow, quiet: str = "") -> bool:
        operation = REQUEST_OF.get(row.operation or "") or _TRANSIENT.get(row.status)
        if operation is None:
            return False
        step = row.phase or row.status
        quiet = quiet or f"no progress in step {step} ({row.status}) for {self._stuck_after.total_seconds():g} s"
        done = await self._redrives(row.id)
        if done < self._max_redrives:
            kind = row.operation or ("delete" if operation == bus_pb2.OPERATION_DELETE else "placement")
            change = EventInput(
                event_id=redrive_id(row),
                status=row.status,
                phase=row.phase,
                message=f"{quiet}: its {kind} request is sent again ({done + 1} of {self._max_redrives})",
                source=SOURCE,
            )
            log.warning("deployment %s: %s", row.id, change.message)
            return await self._apply(row, change, placement_outbox(operation, self._rollout_timeout))
        message = f"stuck in step {step} ({row.status}): {quiet}, after {done} re-drives"
        change = EventInput(
            event_id=_stuck_id(row),
            status="error",
            phase=row.phase,
            message=message,
            source=SOURCE,
            fields={"error_message": message},
        )
        log.warning("deployment %s: %s", row.id, message)
        # Also on the bus, as workers' reports are: the scheduler frees what the deployment held.
        return await self._apply(row, change, lambda _row, _deployment: [_status_event(row.id, change)])

    async def _apply(self, row: DeploymentRow, change: EventInput, outbox: OutboxFn) -> bool:
        try:
            applied = await self._store.apply(row.id, change, outbox)
        except TransitionRejected as rejected:
            # It moved on between the read and this write (a delete, an error): nothing to drive.
            log.info("resync of %s skipped: %s", row.id, rejected)
            return False
        if applied is None:
            return False
        self._on_applied(applied)
        return True


# The streams whose messages stand for a deployment's progress, and how to read its id from one.
_DEPLOYMENT_OF: dict[str, Callable[[bytes], str]] = {
    bus.REQUESTS_STREAM: lambda data: bus_pb2.PlacementRequest.FromString(data).deployment.id,
    bus.JOBS_STREAM: lambda data: bus_pb2.ProvisionJob.FromString(data).deployment.id,
    bus.EVENTS_STREAM: lambda data: bus_pb2.StatusEvent.FromString(data).deployment_id,
}


def _status_event(deployment_id: str, change: EventInput) -> Outgoing:
    """The error the resync applied, as a status event: what it ends is announced as workers' reports are."""
    event = bus_pb2.StatusEvent(
        event_id=change.event_id,
        deployment_id=deployment_id,
        status=STATUSES[change.status],
        phase=change.phase,
        message=change.message,
        source=change.source,
        error_message=change.fields["error_message"],
    )
    event.time.GetCurrentTime()
    # Derived from the event id: a second replica's copy is dropped by JetStream.
    return Outgoing(bus.event_subject(deployment_id), event.SerializeToString(), str(uuid.uuid5(_IDS, change.event_id)))
