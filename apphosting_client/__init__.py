"""A typed Python client of the App Hosting DeploymentService, built on the generated gRPC stubs."""

from apphosting_client.client import AsyncClient
from apphosting_client.config import ClientConfig

__all__ = ["AsyncClient", "ClientConfig"]
