"""A pipeline with authentication for the image updater's tests: the API (its key), a scheduler, a simulated
provisioner, and clients for a user and for the updater's service identity."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from google.protobuf import json_format

from apphosting.imageupdates import UPDATER_ACTOR, RegistryAccess
from apphosting.v1 import deployments_pb2 as pb
from apphosting_client import AsyncClient, ClientConfig
from services.deployments.auth import JwtVerifier, mint_token
from tests.support.stack import Stack

OWNER = "8c1d6a52-3f0e-4b8e-9a57-8f7d1e2c3b4a"


@dataclass
class Platform:
    address: str
    secret: bytes
    user: AsyncClient

    def updater_config(self) -> ClientConfig:
        return ClientConfig(address=self.address, token=mint_token(self.secret, UPDATER_ACTOR))

    async def running(self, name: str, image: str, **fields: Any) -> pb.Deployment:
        body = {
            "geographic_region": "eu",
            "deployment_name": name,
            "app_type": "web_app",
            "docker_image": image,
            "cpu_request": 0.25,
            "memory_request_mb": 256,
            **fields,
        }
        created = await self.user.create(json_format.ParseDict(body, pb.CreateAppHostingDeploymentRequest()))
        return (await until(self.user, created.id, at_rest(1)))[-1].deployment

    async def close(self) -> None:
        await self.user.close()


async def platform(stack: Stack, plain_http: tuple[str, ...]) -> Platform:
    secret = secrets.token_bytes(32)
    await stack.add_api(auth=JwtVerifier.from_secret(secret), registries=RegistryAccess(plain_http=plain_http))
    stack.add_scheduler()
    stack.add_provisioner()
    address = f"127.0.0.1:{stack.apis[-1].port}"
    return Platform(address, secret, AsyncClient(ClientConfig(address=address, token=mint_token(secret, OWNER))))


def at_rest(healthy_release: int) -> Callable[[pb.Deployment], bool]:
    def check(deployment: pb.Deployment) -> bool:
        return (
            deployment.status == pb.DEPLOYMENT_STATUS_RUNNING
            and not deployment.reconciling
            and deployment.healthy_release == healthy_release
        )

    return check


async def until(
    client: AsyncClient,
    deployment_id: str,
    done: Callable[[pb.Deployment], bool],
    *,
    since: int = 0,
    within: float = 90.0,
) -> list[pb.WatchDeploymentResponse]:
    """Watches the deployment (from the revision after `since`, else its current state) until `done` holds for
    it; returns what was seen (AssertionError after `within` s)."""
    seen: list[pb.WatchDeploymentResponse] = []
    try:
        async with asyncio.timeout(within):
            async for item in client.watch(deployment_id, since_revision=since):
                seen.append(item)
                if done(item.deployment):
                    return seen
    except TimeoutError:
        pass
    raise AssertionError(f"deployment {deployment_id} never got there; last seen: {seen[-1:] or None}")


class CountingTransport(httpx.AsyncBaseTransport):
    """Passes the registry client's requests on and remembers them, to count what reaches the registry."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.urls: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.urls.append(str(request.url))
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def tag_lists(self, repository: str) -> int:
        return sum(1 for url in self.urls if f"/v2/{repository}/tags/list" in url)
