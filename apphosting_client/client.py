"""The async client: one method per RPC, UNAVAILABLE retried with backoff, watches that resume by themselves."""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf import field_mask_pb2
from google.protobuf.message import Message

from apphosting.v1 import api_keys_pb2, api_keys_pb2_grpc, deployments_pb2_grpc
from apphosting.v1 import deployments_pb2 as pb
from apphosting_client.config import ClientConfig
from apphosting_client.errors import error_reason

log = logging.getLogger(__name__)

T = TypeVar("T")
# Transient answers a call is sent again for: the server or its backend is briefly away.
_RETRIED = frozenset({grpc.StatusCode.UNAVAILABLE})
# The longest pause between two attempts, however many failed before.
_BACKOFF_CAP = 5.0


class _Backoff:
    """Capped exponential pauses with full jitter, within a total time: spreads the retries of many
    clients after one outage instead of sending them all at once."""

    def __init__(self, base: float, total: float) -> None:
        self._base = base
        self._total = total
        self.reset()

    def reset(self) -> None:
        self._delay = self._base
        self._deadline = asyncio.get_running_loop().time() + self._total

    async def pause(self) -> bool:
        """Waits before the next attempt; False (without waiting) when no time is left for one."""
        remaining = self._deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            return False
        await asyncio.sleep(min(random.uniform(0, self._delay), remaining))
        self._delay = min(self._delay * 2, _BACKOFF_CAP)
        return True


class AsyncClient:
    """A connection to one API address; use as `async with AsyncClient(config) as client:`.

    A call answered UNAVAILABLE is sent again, up to `attempts` times and within `retry_for` seconds,
    after capped exponential pauses with jitter starting at `backoff`; a watch resumes within
    `retry_for` seconds of its last answer. Without a config, ClientConfig.load() finds one.
    `credentials`, when given, makes each call's metadata instead of the configured token (a gateway
    passes on the token of the request it serves).
    """

    def __init__(
        self,
        config: ClientConfig | None = None,
        *,
        attempts: int = 5,
        backoff: float = 0.2,
        retry_for: float = 60.0,
        credentials: Callable[[], Sequence[tuple[str, str]]] | None = None,
    ) -> None:
        self.config = config or ClientConfig.load()
        self._credentials = credentials
        self._attempts = attempts
        self._backoff = backoff
        self._retry_for = retry_for
        if self.config.tls:
            root = None
            if self.config.ca_file:
                with open(self.config.ca_file, "rb") as handle:
                    root = handle.read()
            self._channel = grpc.aio.secure_channel(self.config.address, grpc.ssl_channel_credentials(root))
        else:
            self._channel = grpc.aio.insecure_channel(self.config.address)
        self.stub = deployments_pb2_grpc.DeploymentServiceStub(self._channel)
        self.api_keys_stub = api_keys_pb2_grpc.ApiKeyServiceStub(self._channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def _metadata(self) -> Sequence[tuple[str, str]]:
        if self._credentials is not None:
            return self._credentials()
        # Read per call: a token file rotated under a running client is picked up at its next call.
        token = self.config.current_token()
        return (("authorization", f"Bearer {token}"),) if token else ()

    async def _call(self, method: Callable[..., Awaitable[T]], request: Any, *, attempts: int | None = None) -> T:
        backoff = _Backoff(self._backoff, self._retry_for)
        attempts = attempts or self._attempts
        for attempt in range(1, attempts + 1):
            try:
                return await method(request, metadata=self._metadata(), timeout=self.config.timeout)
            except grpc.aio.AioRpcError as error:
                if error.code() not in _RETRIED or attempt == attempts:
                    raise
                log.info("%s (attempt %d of %d); retrying", error.details(), attempt, attempts)
                if not await backoff.pause():
                    raise
        raise AssertionError("unreachable")

    async def create(self, request: pb.CreateAppHostingDeploymentRequest) -> pb.Deployment:
        """Creates a deployment; a request_id is set when absent, so a retried call never creates two."""
        if not request.request_id and not request.validate_only:
            request = _copy(request)
            request.request_id = str(uuid.uuid4())
        return await self._call(self.stub.CreateAppHostingDeployment, request)

    async def get(self, deployment_id: str) -> pb.Deployment:
        return await self._call(self.stub.GetDeployment, pb.GetDeploymentRequest(id=deployment_id))

    async def list(
        self,
        *,
        statuses: Sequence[pb.DeploymentStatus.ValueType] = (),
        geographic_region: str = "",
        show_deleted: bool = False,
        page_size: int = 0,
        page_token: str = "",
    ) -> pb.ListDeploymentsResponse:
        request = pb.ListDeploymentsRequest(
            statuses=statuses,
            geographic_region=geographic_region,
            show_deleted=show_deleted,
            page_size=page_size,
            page_token=page_token,
        )
        return await self._call(self.stub.ListDeployments, request)

    async def list_all(self, **filters: Any) -> AsyncIterator[pb.Deployment]:
        token = ""
        while True:
            page = await self.list(page_token=token, **filters)
            for deployment in page.deployments:
                yield deployment
            token = page.next_page_token
            if not token:
                return

    async def delete(self, deployment_id: str, *, etag: str = "", force: bool = False) -> pb.Deployment:
        request = pb.DeleteDeploymentRequest(id=deployment_id, etag=etag, force=force)
        return await self._call(self.stub.DeleteDeployment, request)

    async def retry(self, deployment_id: str, *, etag: str = "") -> pb.Deployment:
        return await self._call(self.stub.RetryDeployment, pb.RetryDeploymentRequest(id=deployment_id, etag=etag))

    async def update(
        self,
        deployment: pb.Deployment,
        paths: Sequence[str],
        *,
        etag: str = "",
        validate_only: bool = False,
        reason: str = "",
    ) -> pb.Deployment:
        request = pb.UpdateDeploymentRequest(
            deployment=deployment,
            update_mask=field_mask_pb2.FieldMask(paths=list(paths)),
            etag=etag,
            validate_only=validate_only,
            reason=reason,
        )
        return await self._call(self.stub.UpdateDeployment, request)

    async def scale(
        self, deployment_id: str, replicas: int, *, etag: str = "", reason: str = "", validate_only: bool = False
    ) -> pb.Deployment:
        request = pb.ScaleDeploymentRequest(
            id=deployment_id, replicas=replicas, etag=etag, reason=reason, validate_only=validate_only
        )
        return await self._call(self.stub.ScaleDeployment, request)

    async def stop(
        self, deployment_id: str, *, etag: str = "", reason: str = "", validate_only: bool = False
    ) -> pb.Deployment:
        request = pb.StopDeploymentRequest(id=deployment_id, etag=etag, reason=reason, validate_only=validate_only)
        return await self._call(self.stub.StopDeployment, request)

    async def start(
        self, deployment_id: str, *, etag: str = "", reason: str = "", validate_only: bool = False
    ) -> pb.Deployment:
        request = pb.StartDeploymentRequest(id=deployment_id, etag=etag, reason=reason, validate_only=validate_only)
        return await self._call(self.stub.StartDeployment, request)

    async def rollback(
        self, deployment_id: str, release: int = 0, *, etag: str = "", reason: str = "", validate_only: bool = False
    ) -> pb.Deployment:
        request = pb.RollbackDeploymentRequest(
            id=deployment_id, release=release, etag=etag, reason=reason, validate_only=validate_only
        )
        return await self._call(self.stub.RollbackDeployment, request)

    async def promote(self, request: pb.PromoteDeploymentRequest) -> pb.PromoteDeploymentResponse:
        if not request.request_id and not request.validate_only:
            request = _copy(request)
            request.request_id = str(uuid.uuid4())
        return await self._call(self.stub.PromoteDeployment, request)

    async def adopt(self, request: pb.AdoptDeploymentRequest) -> pb.Deployment:
        if not request.request_id and not request.validate_only:
            request = _copy(request)
            request.request_id = str(uuid.uuid4())
        return await self._call(self.stub.AdoptDeployment, request)

    async def releases(
        self, deployment_id: str, *, page_size: int = 0, page_token: str = ""
    ) -> pb.ListReleasesResponse:
        request = pb.ListReleasesRequest(id=deployment_id, page_size=page_size, page_token=page_token)
        return await self._call(self.stub.ListReleases, request)

    async def preview_image_update(self, deployment_id: str) -> pb.PreviewImageUpdateResponse:
        """Which tag the deployment's image update policy would deploy now, and why; writes nothing."""
        request = pb.PreviewImageUpdateRequest(id=deployment_id)
        return await self._call(self.stub.PreviewImageUpdate, request)

    async def create_api_key(
        self, name: str, *, read_only: bool = False, ttl_seconds: int = 0
    ) -> api_keys_pb2.CreateApiKeyResponse:
        """Makes an API key; its secret is in the answer's `key`, and nowhere else, ever.

        Sent once, not retried: a create that happened but whose answer was lost would leave a key
        whose secret nobody saw (it shows in list_api_keys, to be revoked).
        """
        request = api_keys_pb2.CreateApiKeyRequest(name=name, read_only=read_only, ttl_seconds=ttl_seconds)
        return await self._call(self.api_keys_stub.CreateApiKey, request, attempts=1)

    async def list_api_keys(self, *, page_size: int = 0, page_token: str = "") -> api_keys_pb2.ListApiKeysResponse:
        request = api_keys_pb2.ListApiKeysRequest(page_size=page_size, page_token=page_token)
        return await self._call(self.api_keys_stub.ListApiKeys, request)

    async def list_all_api_keys(self) -> AsyncIterator[api_keys_pb2.ApiKey]:
        token = ""
        while True:
            page = await self.list_api_keys(page_token=token)
            for key in page.api_keys:
                yield key
            token = page.next_page_token
            if not token:
                return

    async def revoke_api_key(self, key_id: str) -> api_keys_pb2.ApiKey:
        """Revokes one of the caller's keys; revoking a revoked key answers it unchanged."""
        return await self._call(self.api_keys_stub.RevokeApiKey, api_keys_pb2.RevokeApiKeyRequest(id=key_id))

    async def watch(self, deployment_id: str, *, since_revision: int = 0) -> AsyncIterator[pb.WatchDeploymentResponse]:
        """The deployment's state (when since_revision is 0), then every change until its final one.

        A stream that breaks (the replica stopped with SHUTTING_DOWN, the network dropped, the address
        now reaches another replica) is opened again after the last revision seen, so every change
        arrives once and in order across server restarts and replicas; it gives up (raising the last
        UNAVAILABLE) when no replica answers for retry_for seconds. When the server no longer keeps
        the history after that revision (REVISION_TOO_OLD), the watch starts over from the current
        state, which then comes as an item without an event.
        """
        last = since_revision
        backoff = _Backoff(self._backoff, self._retry_for)
        while True:
            stream = self.stub.WatchDeployment(
                pb.WatchDeploymentRequest(id=deployment_id, since_revision=last), metadata=self._metadata()
            )
            try:
                async for item in stream:
                    backoff.reset()
                    revision = item.event.revision if item.HasField("event") else item.deployment.revision
                    if item.HasField("event") and revision <= last:
                        # Already delivered before the stream broke: a replica replays from where it was asked.
                        continue
                    last = revision
                    yield item
                    if item.event.final or (item.deployment.HasField("deleted_at") and not item.HasField("event")):
                        return
                # The server ends a watch only after the final change; any other end is a broken stream.
                log.info("watch of %s ended early; resuming after revision %d", deployment_id, last)
                if not await backoff.pause():
                    raise ConnectionError(f"the watch of {deployment_id} keeps ending before its final change")
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.OUT_OF_RANGE and error_reason(error) == "REVISION_TOO_OLD":
                    log.warning("watch of %s: %s; starting over from the current state", deployment_id, error.details())
                    last = 0
                    continue
                if error.code() not in _RETRIED:
                    raise
                log.info("watch of %s broke (%s); resuming after revision %d", deployment_id, error.details(), last)
                if not await backoff.pause():
                    raise
            finally:
                stream.cancel()


M = TypeVar("M", bound=Message)


def _copy(message: M) -> M:
    copied = type(message)()
    copied.CopyFrom(message)
    return copied
