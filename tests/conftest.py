"""Fixtures: a real nats-server per test, a database per test (SQLite, and PostgreSQL where reachable),
and the API served on a free port with a real gRPC channel to it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from apphosting.nats_server import NatsServer
from apphosting.v1 import deployments_pb2_grpc
from services.deployments.app import ApiOptions, ApiServer
from services.deployments.quotas import UNLIMITED
from tests.support.databases import (
    create_postgres_database,
    drop_postgres_database,
    postgres_unreachable_reason,
)

if TYPE_CHECKING:
    from apphosting.v1.deployments_pb2_grpc import DeploymentServiceAsyncStub

# The pipeline fixtures (stack, pipeline, locations) for every test folder.
pytest_plugins = ["tests.support.stack"]


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "jetstream")
    server.start()
    yield server
    server.stop()


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgresql", marks=pytest.mark.postgres),
    ]
)
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """Every test that takes this runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'apphosting.db'}"
        return
    reason = postgres_unreachable_reason()
    if reason is not None:
        pytest.skip(reason)
    url, name = await create_postgres_database()
    try:
        yield url
    finally:
        await drop_postgres_database(name)


@pytest.fixture
async def api(database_url: str, nats_server: NatsServer) -> AsyncIterator[ApiServer]:
    # Single-user local mode without quotas: these tests are not about either (tests/security/ is).
    server = ApiServer(
        ApiOptions(
            listen="127.0.0.1:0", database_url=database_url, nats_url=nats_server.url, auth=None, quotas=UNLIMITED
        )
    )
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def channel(api: ApiServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{api.port}") as channel:
        yield channel


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> DeploymentServiceAsyncStub:
    return deployments_pb2_grpc.DeploymentServiceStub(channel)
