"""The Python client against the real pipeline: blocking and async calls, a create whose answer is lost,
and a watch that follows its deployment from a stopping API replica to another."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import pytest
from google.protobuf import json_format

from apphosting.nats_server import free_port
from apphosting.v1 import deployments_pb2 as pb
from apphosting_client import AsyncClient, Client, ClientConfig
from tests.support.stack import Stack, eventually
from tests.support.tcp_proxy import TcpProxy

RUNNING = pb.DEPLOYMENT_STATUS_RUNNING
# HTTP/2 frame header: 3 bytes of length, a type, flags, a 4-byte stream id (RFC 9113 section 4.1).
_FRAME_HEADER = 9
_HEADERS = 0x1


def request(name: str, **fields: Any) -> pb.CreateAppHostingDeploymentRequest:
    body = {
        "geographic_region": "eu",
        "deployment_name": name,
        "app_type": "web_app",
        "docker_image": "ghcr.io/acme/web:1.0.0",
        "cpu_request": 0.5,
        "memory_request_mb": 512,
    }
    body.update(fields)
    return json_format.ParseDict(body, pb.CreateAppHostingDeploymentRequest())


def settled(deployment: pb.Deployment, replicas: int | None = None) -> bool:
    """Running with nothing left to do (and, when given, that many replicas)."""
    at_rest = deployment.status == RUNNING and not deployment.reconciling
    return at_rest and (replicas is None or deployment.replicas == replicas)


def assert_once_and_in_order(seen: list[pb.WatchDeploymentResponse]) -> None:
    """The state first, then every revision after it exactly once, ending with the final change."""
    assert not seen[0].HasField("event")
    revisions = [item.event.revision for item in seen[1:]]
    assert revisions == list(range(seen[0].deployment.revision + 1, seen[0].deployment.revision + 1 + len(revisions)))
    assert seen[-1].event.final
    assert [item.deployment.revision for item in seen[1:]] == revisions


class AnswerLosingProxy:
    """Passes a gRPC connection through, but drops the first connection the moment the server starts
    answering a call on it: the request was received and handled, its answer never arrives."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.connections = 0
        self.lost = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        losing = self.lost == 0
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        up = asyncio.create_task(self._pipe(reader, up_writer))
        down = asyncio.create_task(self._answers(up_reader, writer, losing))
        await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        writer.transport.abort()
        up_writer.transport.abort()
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()

    async def _answers(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, losing: bool) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                header = await reader.readexactly(_FRAME_HEADER)
                payload = await reader.readexactly(int.from_bytes(header[:3], "big"))
                stream = int.from_bytes(header[5:9], "big") & 0x7FFFFFFF
                if losing and header[3] == _HEADERS and stream != 0:
                    self.lost += 1
                    return
                writer.write(header + payload)
                await writer.drain()


async def test_the_blocking_client_deploys_watches_scales_and_deletes(stack: Stack) -> None:
    await stack.add_api()
    stack.add_scheduler()
    stack.add_provisioner()
    address = f"127.0.0.1:{stack.apis[0].port}"

    def use() -> tuple[list[pb.WatchDeploymentResponse], list[str], pb.Deployment]:
        with Client(ClientConfig(address=address)) as client:
            created = client.create(request("sync-web"))
            with client.watch(created.id) as stream:
                for item in stream:
                    if settled(item.deployment):
                        break
            scaled = client.scale(created.id, 2, reason="more")
            assert scaled.replicas == 2
            with client.watch(created.id, since_revision=scaled.revision) as stream:
                for item in stream:
                    if settled(item.deployment, 2):
                        break
            names = [deployment.name for deployment in client.list_all()]
            fetched = client.get(created.id)
            deleted = client.delete(created.id, etag=fetched.etag)
            assert deleted.id == created.id
            seen = list(client.watch(created.id))
            return seen, names, fetched

    async with asyncio.timeout(90):
        seen, names, fetched = await asyncio.to_thread(use)
    assert names == ["sync-web"]
    assert settled(fetched, 2)
    assert seen[-1].event.final
    assert_once_and_in_order(seen)


async def test_a_create_whose_answer_is_lost_is_sent_again_and_makes_one_deployment(stack: Stack) -> None:
    await stack.add_api()
    proxy = AnswerLosingProxy(stack.apis[0].port)
    await proxy.start()
    try:
        async with AsyncClient(ClientConfig(address=f"127.0.0.1:{proxy.port}"), backoff=0.05) as client:
            created = await client.create(request("once"))
            assert proxy.lost == 1, "the first answer was dropped on its way back"
            assert proxy.connections >= 2, "the create was sent again on a new connection"
            listed = [deployment async for deployment in client.list_all()]
    finally:
        await proxy.close()
    assert [deployment.id for deployment in listed] == [created.id]


async def test_a_watch_follows_its_deployment_from_a_stopping_replica_to_another(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="apphosting_client")
    await stack.add_api()
    second = await stack.add_api()
    stack.add_scheduler()
    stack.add_provisioner()
    first, other = stack.apis
    # One address for the client, as a load balancer in front of the replicas would give it.
    proxy = TcpProxy("127.0.0.1", first.port)
    await proxy.start()
    seen: list[pb.WatchDeploymentResponse] = []
    try:
        async with AsyncClient(ClientConfig(address=f"127.0.0.1:{proxy.port}"), backoff=0.05) as client:
            created = await client.create(request("follow"))

            async def follow() -> None:
                async for item in client.watch(created.id):
                    seen.append(item)

            watching = asyncio.create_task(follow())
            try:
                await eventually(lambda: _true(bool(seen) and settled(seen[-1].deployment)), within=60)
                # The balancer sends new connections to the other replica, and the first one stops:
                # its watches end with UNAVAILABLE SHUTTING_DOWN and the revision to resume after.
                proxy.target = ("127.0.0.1", other.port)
                await first.stop()
                before = len(seen)
                await second.ScaleDeployment(pb.ScaleDeploymentRequest(id=created.id, replicas=3))
                await eventually(lambda: _true(settled(seen[-1].deployment, 3)), within=60)
                assert len(seen) > before
                await second.DeleteDeployment(pb.DeleteDeploymentRequest(id=created.id))
                async with asyncio.timeout(60):
                    await watching
            finally:
                watching.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watching
    finally:
        await proxy.cut()
    assert_once_and_in_order(seen)
    assert any("resuming after revision" in record.getMessage() for record in caplog.records)


async def test_a_watch_resumes_across_a_restart_of_the_only_replica(stack: Stack) -> None:
    await stack.add_api()
    stack.add_scheduler()
    stack.add_provisioner()
    proxy = TcpProxy("127.0.0.1", stack.apis[0].port)
    await proxy.start()
    seen: list[pb.WatchDeploymentResponse] = []
    try:
        async with AsyncClient(ClientConfig(address=f"127.0.0.1:{proxy.port}"), backoff=0.05) as client:
            created = await client.create(request("restart"))

            async def follow() -> None:
                async for item in client.watch(created.id):
                    seen.append(item)

            watching = asyncio.create_task(follow())
            try:
                await eventually(lambda: _true(bool(seen) and settled(seen[-1].deployment)), within=60)
                # The API is away for a while (the address refuses connections), then a new one serves.
                await proxy.cut()
                await stack.apis[0].stop()
                replacement = await stack.add_api()
                proxy.target = ("127.0.0.1", stack.apis[-1].port)
                await proxy.start()
                current = await replacement.GetDeployment(pb.GetDeploymentRequest(id=created.id))
                await replacement.DeleteDeployment(pb.DeleteDeploymentRequest(id=created.id, etag=current.etag))
                async with asyncio.timeout(60):
                    await watching
            finally:
                watching.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watching
    finally:
        await proxy.cut()
    assert_once_and_in_order(seen)


async def _true(value: bool) -> bool:
    return value
