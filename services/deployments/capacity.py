"""Questions to the scheduler about capacity, which it alone holds: over NATS request/reply."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from apphosting import bus
from apphosting.v1 import bus_pb2
from apphosting.v1 import deployments_pb2 as pb
from services.deployments import errors
from services.deployments.errors import ServiceError

log = logging.getLogger(__name__)


class Capacity:
    """Asks the scheduler whether a demand fits, to hold it, or where a deployment would go and why."""

    def __init__(self, client: Callable[[], Client | None], timeout: float = 5.0) -> None:
        self._client = client
        self._timeout = timeout

    async def ask(
        self, mode: bus_pb2.CapacityMode.ValueType, deployment: pb.Deployment, location_id: str = ""
    ) -> bus_pb2.CapacityReply:
        deadline = asyncio.get_running_loop().time() + self._timeout
        payload = bus_pb2.CapacityRequest(mode=mode, deployment=deployment, location_id=location_id).SerializeToString()
        while True:
            nc = await self._connected()
            left = deadline - asyncio.get_running_loop().time()
            try:
                reply = await nc.request(bus.CAPACITY_SUBJECT, payload, timeout=max(left, 0.1))
                return bus_pb2.CapacityReply.FromString(reply.data)
            except NoRespondersError:
                # No scheduler listens right now (starting, or restarting): ask again until the deadline.
                if asyncio.get_running_loop().time() > deadline:
                    raise errors.unavailable("the scheduler (none answers about capacity)") from None
                await asyncio.sleep(0.1)
            except (NatsTimeoutError, TimeoutError):
                raise errors.unavailable("the scheduler (no answer about capacity)") from None

    async def _connected(self) -> Client:
        """The bus connection, waited for a while when it is (re)connecting."""
        deadline = asyncio.get_running_loop().time() + self._timeout
        while True:
            nc = self._client()
            if nc is not None and nc.is_connected:
                return nc
            if asyncio.get_running_loop().time() > deadline:
                raise errors.unavailable("the scheduler (no connection to the bus)")
            await asyncio.sleep(0.05)

    async def hold(self, deployment: pb.Deployment, *, validate_only: bool) -> None:
        """Holds what `deployment` (its new spec, its status) needs on its location, or only checks it
        with validate_only; FAILED_PRECONDITION naming the shortfall when it does not fit."""
        mode = bus_pb2.CAPACITY_MODE_CHECK if validate_only else bus_pb2.CAPACITY_MODE_RESERVE
        reply = await self.ask(mode, deployment)
        if not reply.fits:
            raise no_room(deployment, reply.message)

    async def restore(self, deployment: pb.Deployment) -> None:
        """Sets what a deployment holds back to what its record says, after a change that was not written."""
        try:
            await self.ask(bus_pb2.CAPACITY_MODE_RESERVE, deployment)
        except ServiceError as failed:
            log.warning("capacity of %s not restored: %s", deployment.id, failed)


def no_room(deployment: pb.Deployment, message: str, hint: str = "") -> ServiceError:
    return ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION,
        "CAPACITY_EXCEEDED",
        f"location {deployment.location_id or '?'} has no room: {message}{hint}",
        metadata={"location_id": deployment.location_id},
    )
