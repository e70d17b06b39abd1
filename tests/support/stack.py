"""Fixtures for the whole pipeline in the test's event loop: a real nats-server, API replicas,
schedulers and simulated provisioners, over SQLite and PostgreSQL (loaded by tests/conftest.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
import yaml
from sqlalchemy.engine import make_url

from apphosting import bus
from apphosting.nats_server import NatsServer
from apphosting.v1 import deployments_pb2_grpc
from provisioner.reconcile import RetryPolicy
from provisioner.worker import Provisioner, ProvisionerOptions
from scheduler.service import Scheduler, SchedulerOptions
from services.deployments.app import ApiOptions, ApiServer
from services.deployments.quotas import UNLIMITED
from tests.support.nats_cluster import NatsCluster
from tests.support.tcp_proxy import TcpProxy

if TYPE_CHECKING:
    from nats.js import JetStreamContext

    from apphosting.v1.deployments_pb2_grpc import DeploymentServiceAsyncStub


FAST = RetryPolicy(backoff_base=0.05, backoff_cap=0.2, max_attempts=3, min_poll=0.01, step_timeout=5.0)


@dataclass
class Stack:
    nats: NatsServer | NatsCluster
    database_url: str
    locations_file: str | None
    apis: list[ApiServer] = field(default_factory=list)
    schedulers: list[Scheduler] = field(default_factory=list)
    provisioners: list[Provisioner] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    async def add_api(self, **options: Any) -> DeploymentServiceAsyncStub:
        api = ApiServer(
            ApiOptions(
                listen="127.0.0.1:0",
                database_url=self.database_url,
                nats_url=self.nats.url,
                locations_file=self.locations_file,
                **{"auth": None, "quotas": UNLIMITED, **options},
            )
        )
        await api.start()
        self.apis.append(api)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{api.port}")
        self.channels.append(channel)
        return deployments_pb2_grpc.DeploymentServiceStub(channel)

    def add_scheduler(self) -> Scheduler:
        scheduler = Scheduler(
            SchedulerOptions(nats_url=self.nats.url, database_url=self.database_url, locations_file=self.locations_file)
        )
        self.schedulers.append(scheduler)
        self.tasks.append(asyncio.create_task(scheduler.run()))
        return scheduler

    def add_provisioner(self, **options: Any) -> Provisioner:
        # Each step on its own event unless a test asks for a report window: at zero delay, whether
        # steps share an event would depend on the machine's load, and these tests read event sequences.
        settings: dict[str, Any] = {"simulate_delay": 0.0, "policy": FAST, "report_window": 0.0, **options}
        provisioner = Provisioner(
            ProvisionerOptions(
                nats_url=self.nats.url,
                locations_file=self.locations_file,
                worker_id=f"test-{len(self.provisioners)}",
                **settings,
            )
        )
        self.provisioners.append(provisioner)
        self.tasks.append(asyncio.create_task(provisioner.run()))
        return provisioner

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()
        for api in self.apis:
            await api.stop()
        for scheduler in self.schedulers:
            scheduler.stop()
        for provisioner in self.provisioners:
            provisioner.stop()
        results = await asyncio.gather(*self.tasks, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, errors


@pytest.fixture
async def proxied_database(database_url: str) -> AsyncIterator[tuple[str, TcpProxy]]:
    """The test's PostgreSQL database behind a proxy the test can cut and restore; SQLite is skipped."""
    url = make_url(database_url)
    if url.get_backend_name() != "postgresql":
        pytest.skip("SQLite is a file in this process: there is no database server to lose")
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.start()
    try:
        yield url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False), proxy
    finally:
        await proxy.cut()


@pytest.fixture
def locations(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    """A test marked `locations([...])` gets exactly those locations; others get the samples."""
    marker = request.node.get_closest_marker("locations")
    if marker is None:
        return None
    path = tmp_path / "locations.yaml"
    path.write_text(yaml.safe_dump({"locations": marker.args[0]}))
    return str(path)


@pytest.fixture
async def stack(nats_server: NatsServer, database_url: str, locations: str | None) -> AsyncIterator[Stack]:
    built = Stack(nats_server, database_url, locations)
    try:
        yield built
    finally:
        await built.close()


@pytest.fixture
async def pipeline(stack: Stack) -> DeploymentServiceAsyncStub:
    """One API, one scheduler and one simulated provisioner; returns a stub for the API."""
    stub = await stack.add_api()
    stack.add_scheduler()
    stack.add_provisioner()
    return stub


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not true after {within} s: {check}")
        await asyncio.sleep(0.05)


async def publish(js: JetStreamContext, subject: str, payload: bytes, msg_id: str, within: float = 60.0) -> None:
    """bus.publish as the platform's publishers use it: sent again under the same id while NATS does
    not acknowledge it (a loaded machine), so it is stored once."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        try:
            await bus.publish(js, subject, payload, msg_id)
            return
        except Exception as failure:
            if not bus.bus_away(failure) or asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)
