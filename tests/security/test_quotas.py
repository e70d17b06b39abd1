"""Per-user quotas over a real channel: each quota, per tenant, and two creates racing for the last room."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from apphosting.v1 import deployments_pb2 as pb
from services.deployments.quotas import Quotas
from tests.integration.test_api import create_request, expect_error
from tests.integration.test_storage import maximum_request
from tests.security.conftest import ApiFactory

NO_LIMIT: dict[str, Any] = {"deployments": None, "cpu": None, "memory_mb": None, "storage_gb": None, "stored_mb": None}


@pytest.mark.parametrize(
    ("quota", "limit", "fits", "exceeds", "used", "requested"),
    [
        ("deployments", 2, {}, {}, "2", "1"),
        # 2 replicas of 0.5 cores each; the default is 0.25 cores for one replica.
        ("cpu", 2.5, {"cpu_request": 0.5, "replicas": 2}, {"cpu_request": 0.5, "replicas": 2}, "2", "1"),
        ("memory_mb", 1000, {"memory_request_mb": 300}, {"memory_request_mb": 500}, "600", "500"),
        (
            "storage_gb",
            45,
            {"storage_size_gb": 5, "volumes": [{"path": "/data"}]},
            {"storage_size_gb": 20},
            "30",
            "20",
        ),
    ],
)
async def test_each_quota_names_itself_its_limit_and_the_use(
    secure_api_factory: ApiFactory,
    quota: str,
    limit: float,
    fits: dict[str, Any],
    exceeds: dict[str, Any],
    used: str,
    requested: str,
) -> None:
    api = await secure_api_factory(quotas=Quotas(**{**NO_LIMIT, quota: limit}))
    alice, bob = api.user("alice"), api.user("bob")
    await api.stub.CreateAppHostingDeployment(create_request(deployment_name="one", **fits), metadata=alice.metadata)
    await api.stub.CreateAppHostingDeployment(create_request(deployment_name="two", **fits), metadata=alice.metadata)
    details = await expect_error(
        api.stub.CreateAppHostingDeployment(
            create_request(deployment_name="three", **exceeds), metadata=alice.metadata
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert details.reason == "QUOTA_EXCEEDED"
    assert details.metadata == {"quota": quota, "limit": f"{limit:g}", "used": used, "requested": requested}
    assert quota in details.message
    # Quotas are per user: bob starts from nothing.
    await api.stub.CreateAppHostingDeployment(create_request(deployment_name="one", **fits), metadata=bob.metadata)
    listed = await api.stub.ListDeployments(pb.ListDeploymentsRequest(), metadata=alice.metadata)
    assert len(listed.deployments) == 2


async def test_stored_bytes_count_against_their_own_quota(secure_api_factory: ApiFactory) -> None:
    # One maximum-size deployment (about 0.57 MiB of request) fits in 1 MiB, a second does not.
    api = await secure_api_factory(quotas=Quotas(**{**NO_LIMIT, "stored_mb": 1}))
    alice, bob = api.user("alice"), api.user("bob")
    await api.stub.CreateAppHostingDeployment(maximum_request("one"), metadata=alice.metadata)
    details = await expect_error(
        api.stub.CreateAppHostingDeployment(maximum_request("two"), metadata=alice.metadata),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert details.reason == "QUOTA_EXCEEDED"
    assert details.metadata["quota"] == "stored_mb"
    assert details.metadata["limit"] == "1"
    assert 0.5 < float(details.metadata["used"]) < 1
    assert 0.5 < float(details.metadata["requested"]) < 1
    # Small deployments still fit beside it, and bob starts from nothing.
    await api.stub.CreateAppHostingDeployment(create_request(deployment_name="small"), metadata=alice.metadata)
    await api.stub.CreateAppHostingDeployment(maximum_request("one"), metadata=bob.metadata)
    assert await api.rows() == 3


async def test_a_replay_is_answered_at_full_quota(secure_api_factory: ApiFactory) -> None:
    api = await secure_api_factory(quotas=Quotas(**{**NO_LIMIT, "deployments": 1}))
    alice = api.user("alice")
    request = create_request(request_id="6f1e2d3c-0000-4000-8000-000000000001")
    first = await api.stub.CreateAppHostingDeployment(request, metadata=alice.metadata)
    assert await api.stub.CreateAppHostingDeployment(request, metadata=alice.metadata) == first


async def test_concurrent_creates_never_exceed_a_quota(secure_api_factory: ApiFactory) -> None:
    # Two API replicas on one database, twenty creates at once for three free places.
    quotas = Quotas(**{**NO_LIMIT, "deployments": 3})
    first = await secure_api_factory(quotas=quotas)
    second = await secure_api_factory(quotas=quotas)
    alice = first.user("alice")
    stubs = [first.stub, second.stub]
    results = await asyncio.gather(
        *(
            stubs[n % 2].CreateAppHostingDeployment(create_request(deployment_name=f"app-{n}"), metadata=alice.metadata)
            for n in range(20)
        ),
        return_exceptions=True,
    )
    created = [r for r in results if isinstance(r, pb.Deployment)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(created) == 3
    assert len(refused) == 17
    assert {r.code() for r in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert await first.rows() == 3
