"""The reference's REST endpoint (POST /deployments/app-hosting and the rest): a thin gateway over the gRPC API."""

from apphosting_cli.rest.app import create_app
from apphosting_cli.rest.server import RestGateway, RestOptions, serve

__all__ = ["RestGateway", "RestOptions", "create_app", "serve"]
