"""The database goes away: callers get UNAVAILABLE, never UNKNOWN, and nothing half-written remains."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from apphosting.nats_server import NatsServer
from apphosting.v1 import deployments_pb2 as pb
from apphosting.v1 import deployments_pb2_grpc
from services.deployments.app import ApiOptions, ApiServer
from tests.e2e.test_pipeline import request
from tests.support.grpc_errors import details_of
from tests.support.tcp_proxy import TcpProxy


async def test_database_down_is_unavailable_and_writes_nothing(
    proxied_database: tuple[str, TcpProxy], nats_server: NatsServer, tmp_path: Path
) -> None:
    url, proxy = proxied_database
    api = ApiServer(ApiOptions(listen="127.0.0.1:0", database_url=url, nats_url=nats_server.url, auth=None))
    await api.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{api.port}") as channel:
            stub = deployments_pb2_grpc.DeploymentServiceStub(channel)
            kept = await stub.CreateAppHostingDeployment(request("before"))
            await proxy.cut()
            for call in (
                stub.CreateAppHostingDeployment(request("during")),
                stub.GetDeployment(pb.GetDeploymentRequest(id=kept.id)),
                stub.ListDeployments(pb.ListDeploymentsRequest()),
                stub.DeleteDeployment(pb.DeleteDeploymentRequest(id=kept.id)),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await call
                details = details_of(raised.value)
                assert details.code == grpc.StatusCode.UNAVAILABLE, details
                assert details.reason == "BACKEND_UNAVAILABLE"
            await proxy.start()
            after = await stub.CreateAppHostingDeployment(request("after"))
            listed = await stub.ListDeployments(pb.ListDeploymentsRequest())
            assert [d.id for d in listed.deployments] == [after.id, kept.id]
            fetched = await stub.GetDeployment(pb.GetDeploymentRequest(id=kept.id))
            assert fetched.status == pb.DEPLOYMENT_STATUS_PENDING
            assert fetched.revision == 1
    finally:
        await api.stop()
