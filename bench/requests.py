"""The request the benchmark creates: the contract's example body with a unique name."""

from __future__ import annotations

import uuid

from google.protobuf import json_format

from apphosting.v1 import deployments_pb2 as pb

# examples/create-deployment.json, the REST contract's example body.
EXAMPLE: dict[str, object] = {
    "geographic_region": "eu",
    "deployment_name": "shop-frontend",
    "app_type": "helm",
    "config": {"team": "web", "tier": "frontend"},
    "cpu_request": 0.5,
    "memory_request_mb": 512,
    "replicas": 1,
    "container_port": 8080,
    "environment_variables": ["LOG_LEVEL=info"],
    "docker_image": "ghcr.io/acme/shop-frontend:1.4.2",
    "storage_size_gb": 1,
    "volumes": [{"path": "/data", "sizeGb": 10, "purpose": "uploads"}],
    "run_as_uid": 1000,
    "deployment_type": "docker",
    "helm_repo_url": "https://charts.bitnami.com/bitnami",
    "helm_chart_name": "nginx",
    "helm_chart_version": "18.2.4",
    "custom_values_yaml": "service:\n  type: ClusterIP\n",
    "image_update_strategy": "semver",
    "image_update_constraint": "^1.4",
    "image_allow_tags": "regexp:^1\\.[0-9]+\\.[0-9]+$",
    "image_ignore_tags": "*-rc*,latest",
    "kubernetes_version": "1.34",
}

_TEMPLATE = json_format.ParseDict(EXAMPLE, pb.CreateAppHostingDeploymentRequest())
# One run's names never collide with another's in a reused database.
_RUN = uuid.uuid4().hex[:6]


def create_request(index: int, region: str = "eu") -> pb.CreateAppHostingDeploymentRequest:
    request = pb.CreateAppHostingDeploymentRequest()
    request.CopyFrom(_TEMPLATE)
    request.deployment_name = f"bench-{_RUN}-{index}"
    request.geographic_region = region
    return request
