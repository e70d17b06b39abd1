"""An API that authenticates with a real JWT key, and tokens for the users of the tests."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from sqlalchemy import func, select

from apphosting.nats_server import NatsServer
from apphosting.v1 import deployments_pb2_grpc
from services.deployments.app import ApiOptions, ApiServer
from services.deployments.auth import JwtVerifier, mint_token
from services.deployments.quotas import UNLIMITED
from services.deployments.tables import DeploymentRow

if TYPE_CHECKING:
    from apphosting.v1.deployments_pb2_grpc import DeploymentServiceAsyncStub

SECRET = b"s" * 16 + b"e" * 16 + b"cret-for-tests"
OTHER_SECRET = b"another-secret-of-more-than-32-bytes!"
# What the stub resolver answers: names under .internal.test are private, the rest public.
PUBLIC_ADDRESS = "93.184.216.34"


async def stub_resolver(host: str) -> Sequence[str]:
    if host.endswith(".internal.test"):
        return ["10.1.2.3"]
    if host.endswith(".mixed.test"):
        return [PUBLIC_ADDRESS, "169.254.169.254"]
    if host.endswith(".nxdomain.test"):
        raise OSError("Name or service not known")
    return [PUBLIC_ADDRESS]


def token_for(user_id: str, *, admin: bool = False, key: Any = SECRET, **options: Any) -> str:
    return mint_token(key, user_id, admin=admin, **options)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@dataclass
class User:
    id: str
    metadata: tuple[tuple[str, str], ...]


@dataclass
class SecureApi:
    server: ApiServer
    stub: DeploymentServiceAsyncStub
    users: dict[str, User] = field(default_factory=dict)

    def user(self, name: str, *, admin: bool = False) -> User:
        if name not in self.users:
            user_id = str(uuid.uuid4())
            self.users[name] = User(user_id, bearer(token_for(user_id, admin=admin)))
        return self.users[name]

    async def rows(self) -> int:
        async with self.server.store.session() as session:
            count: int = await session.scalar(select(func.count()).select_from(DeploymentRow)) or 0
            return count


ApiFactory = Callable[..., Awaitable[SecureApi]]


@pytest.fixture
async def secure_api_factory(database_url: str, nats_server: NatsServer) -> AsyncIterator[ApiFactory]:
    """Starts APIs with HS256 auth (SECRET) and the stub resolver; options override ApiOptions."""
    servers: list[ApiServer] = []
    channels: list[grpc.aio.Channel] = []

    async def start(**options: Any) -> SecureApi:
        settings: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "database_url": database_url,
            "nats_url": nats_server.url,
            "auth": JwtVerifier.from_secret(SECRET, leeway=timedelta(0)),
            "quotas": UNLIMITED,
            "resolver": stub_resolver,
        }
        settings.update(options)
        server = ApiServer(ApiOptions(**settings))
        await server.start()
        servers.append(server)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        channels.append(channel)
        return SecureApi(server, deployments_pb2_grpc.DeploymentServiceStub(channel))

    yield start
    for channel in channels:
        await channel.close()
    for server in servers:
        await server.stop()


@pytest.fixture
async def secure(secure_api_factory: ApiFactory) -> SecureApi:
    return await secure_api_factory()
