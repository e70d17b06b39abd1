"""Records as the service hands them to the store, for tests that drive the store directly."""

from __future__ import annotations

from services.deployments.quotas import demand_of_spec
from services.deployments.store import NewDeployment


def new_deployment(name: str, user_id: str, request_id: str | None = None, request_hash: str = "h") -> NewDeployment:
    """A validated create of a web app in `eu` asking 250 millicores and 256 MiB."""
    spec = {"deployment_name": name, "docker_image": "nginx:1", "cpu_request": 0.25, "memory_request_mb": 256}
    return NewDeployment(
        user_id=user_id,
        name=name,
        app_type="web_app",
        geographic_region="eu",
        spec=spec,
        request_id=request_id,
        request_hash=request_hash,
        demand=demand_of_spec(spec),
    )
