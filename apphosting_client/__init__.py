"""A typed Python client of the App Hosting DeploymentService, built on the generated gRPC stubs."""

from apphosting_client.client import AsyncClient
from apphosting_client.config import DEFAULT_ADDRESS, DEFAULT_CONFIG_FILE, ClientConfig, ConfigError
from apphosting_client.errors import CallError, Violation, error_reason, read_error
from apphosting_client.sync import Client, Stream

__all__ = [
    "DEFAULT_ADDRESS",
    "DEFAULT_CONFIG_FILE",
    "AsyncClient",
    "CallError",
    "Client",
    "ClientConfig",
    "ConfigError",
    "Stream",
    "Violation",
    "error_reason",
    "read_error",
]
