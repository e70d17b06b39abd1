"""Every call is counted once, by the code it ended with: refused before its servicer ran, a stream its caller
ended, a body that does not decode, a probe that needs no token."""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apphosting.v1 import deployments_pb2 as pb
from tests.integration.test_api import create_request, expect_error
from tests.integration.test_metrics import check_metrics, samples, scrape, value
from tests.security.conftest import ApiFactory
from tests.support.stack import eventually

SERVICE = "apphosting.v1.DeploymentService"


async def test_every_call_is_counted_once_by_the_code_it_ended_with(secure_api_factory: ApiFactory) -> None:
    secure = await secure_api_factory(metrics_listen="127.0.0.1:0")
    stub, alice = secure.stub, secure.user("alice")
    address = f"127.0.0.1:{secure.server.port}"

    await expect_error(stub.GetDeployment(pb.GetDeploymentRequest(id="x")), grpc.StatusCode.UNAUTHENTICATED)
    created = await stub.CreateAppHostingDeployment(create_request(), metadata=alice.metadata)
    async with grpc.aio.insecure_channel(address) as channel:
        # A body that is not a CreateAppHostingDeploymentRequest: the caller's error, not the server's.
        raw: Any = channel.unary_unary(f"/{SERVICE}/CreateAppHostingDeployment")
        await expect_error(raw(b"\xff\xff\xff", metadata=alice.metadata), grpc.StatusCode.INVALID_ARGUMENT)
        health: Any = health_pb2_grpc.HealthStub(channel)
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING
    watch = stub.WatchDeployment(pb.WatchDeploymentRequest(id=created.id), metadata=alice.metadata)
    first = await watch.read()
    assert isinstance(first, pb.WatchDeploymentResponse)
    assert first.deployment.id == created.id
    watch.cancel()

    def method(name: str) -> dict[str, str]:
        return {"grpc_service": SERVICE, "grpc_method": name}

    watched = method("WatchDeployment")

    async def stream_counted_out() -> bool:
        found = samples(await scrape(secure.server.metrics_server))
        return value(found, "grpc_server_handled_total", **watched) == 1

    # The server learns of the cancel on its own time.
    await eventually(stream_counted_out, within=60)
    text = await scrape(secure.server.metrics_server)
    check_metrics(text)
    found = samples(text)
    get, create = method("GetDeployment"), method("CreateAppHostingDeployment")
    assert value(found, "grpc_server_started_total", grpc_type="unary", **get) == 1
    assert value(found, "grpc_server_handled_total", grpc_code="UNAUTHENTICATED", **get) == 1
    assert value(found, "grpc_server_started_total", grpc_type="unary", **create) == 2
    assert value(found, "grpc_server_handled_total", grpc_code="OK", **create) == 1
    assert value(found, "grpc_server_handled_total", grpc_code="INVALID_ARGUMENT", **create) == 1
    assert value(found, "grpc_server_handling_seconds_count", **create) == 2
    assert value(found, "grpc_server_started_total", grpc_type="server_stream", **watched) == 1
    assert value(found, "grpc_server_msg_sent_total", grpc_type="server_stream", **watched) == 1
    # Only streams count the messages they send: no unary method has a series there, not even at 0.
    assert not [
        labels for name, labels in found if name == "grpc_server_msg_sent_total" and ("grpc_type", "unary") in labels
    ]
    # Ended by its caller: CANCELLED, not UNKNOWN (which would read as the server's failure).
    assert value(found, "grpc_server_handled_total", grpc_code="CANCELLED", **watched) == 1
    probe = {"grpc_service": "grpc.health.v1.Health", "grpc_method": "Check"}
    assert value(found, "grpc_server_handled_total", grpc_code="OK", **probe) == 1
    assert value(found, "grpc_server_handled_total", grpc_code="UNKNOWN") == 0
