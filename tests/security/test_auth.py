"""Authentication and tenancy over a real channel: own, another tenant's, admin, none, expired, wrong key."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from apphosting.v1 import deployments_pb2 as pb
from services.deployments.auth import JwtVerifier
from services.deployments.errors import DOMAIN
from services.deployments.store import EventInput
from tests.integration.test_api import create_request, expect_error
from tests.security.conftest import OTHER_SECRET, SECRET, ApiFactory, SecureApi, bearer, token_for


async def _unauthenticated(call: Any, reason: str) -> None:
    details = await expect_error(call, grpc.StatusCode.UNAUTHENTICATED)
    assert details.reason == reason, details
    assert details.domain == DOMAIN


def _now() -> datetime:
    return datetime.now(UTC)


# (what is wrong, the call metadata, the ErrorInfo reason)
REFUSED: list[tuple[str, tuple[tuple[str, str], ...], str]] = [
    ("none", (), "TOKEN_MISSING"),
    ("expired", bearer(token_for(str(uuid.uuid4()), now=_now() - timedelta(hours=2))), "TOKEN_EXPIRED"),
    ("wrong key", bearer(token_for(str(uuid.uuid4()), key=OTHER_SECRET)), "TOKEN_INVALID"),
    ("not a jwt", bearer("not.a.jwt"), "TOKEN_INVALID"),
    ("not bearer", (("authorization", "Basic dXNlcjpwYXNz"),), "TOKEN_INVALID"),
    ("sub not a uuid", bearer(token_for("alice")), "TOKEN_INVALID"),
    ("no exp", bearer(token_for(str(uuid.uuid4()), claims={"exp": None})), "TOKEN_INVALID"),
    (
        "alg none",
        bearer(
            # An unsigned token naming the user: must never be taken at its word.
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0."
            "eyJzdWIiOiIzZjFjMDAwMC0wMDAwLTQwMDAtODAwMC0wMDAwMDAwMDAwMDAiLCJleHAiOjQxMDI0NDQ4MDB9."
        ),
        "TOKEN_INVALID",
    ),
]


async def test_calls_without_a_valid_token_are_unauthenticated(secure: SecureApi) -> None:
    for case, metadata, reason in REFUSED:
        assert case  # named for the reader of a failure: see REFUSED
        await _refused_everywhere(secure, metadata, reason)
    assert await secure.rows() == 0


async def _refused_everywhere(secure: SecureApi, metadata: tuple[tuple[str, str], ...], reason: str) -> None:
    stub = secure.stub
    await _unauthenticated(stub.CreateAppHostingDeployment(create_request(), metadata=metadata), reason)
    await _unauthenticated(stub.GetDeployment(pb.GetDeploymentRequest(id=str(uuid.uuid4())), metadata=metadata), reason)
    await _unauthenticated(stub.ListDeployments(pb.ListDeploymentsRequest(), metadata=metadata), reason)
    await _unauthenticated(
        stub.DeleteDeployment(pb.DeleteDeploymentRequest(id=str(uuid.uuid4())), metadata=metadata), reason
    )
    await _unauthenticated(
        stub.RetryDeployment(pb.RetryDeploymentRequest(id=str(uuid.uuid4())), metadata=metadata), reason
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in stub.WatchDeployment(pb.WatchDeploymentRequest(id=str(uuid.uuid4())), metadata=metadata):
            pass
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in stub.WatchDeployments(pb.WatchDeploymentsRequest(), metadata=metadata):
            pass
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_health_and_reflection_need_no_token(secure: SecureApi) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{secure.server.port}") as channel:
        health: Any = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest())
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflection: Any = reflection_pb2_grpc.ServerReflectionStub(channel)  # type: ignore[arg-type]
        async for response in reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        ):
            names = {service.name for service in response.list_services_response.service}
            assert "apphosting.v1.DeploymentService" in names


async def test_own_deployments_only_and_another_tenants_id_is_not_found(secure: SecureApi) -> None:
    stub, alice, bob = secure.stub, secure.user("alice"), secure.user("bob")
    mine = await stub.CreateAppHostingDeployment(create_request(deployment_name="web"), metadata=alice.metadata)
    assert mine.user_id == alice.id
    # Names are per tenant: bob may use the same one.
    theirs = await stub.CreateAppHostingDeployment(create_request(deployment_name="web"), metadata=bob.metadata)
    assert theirs.user_id == bob.id

    assert await stub.GetDeployment(pb.GetDeploymentRequest(id=mine.id), metadata=alice.metadata) == mine
    listed = await stub.ListDeployments(pb.ListDeploymentsRequest(), metadata=alice.metadata)
    assert [d.id for d in listed.deployments] == [mine.id]

    # Bob's id and an id that never existed get the very same answer, so ids leak nothing.
    unknown = str(uuid.uuid4())
    for target in (theirs.id, unknown):
        for call in (
            stub.GetDeployment(pb.GetDeploymentRequest(id=target), metadata=alice.metadata),
            stub.DeleteDeployment(pb.DeleteDeploymentRequest(id=target), metadata=alice.metadata),
            stub.RetryDeployment(pb.RetryDeploymentRequest(id=target), metadata=alice.metadata),
        ):
            details = await expect_error(call, grpc.StatusCode.NOT_FOUND)
            assert details.reason == "DEPLOYMENT_NOT_FOUND"
            assert details.message == f"deployment {target} does not exist"
            assert details.metadata == {"id": target}
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in stub.WatchDeployment(pb.WatchDeploymentRequest(id=target), metadata=alice.metadata):
                pass
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        assert raised.value.details() == f"deployment {target} does not exist"
    # Nothing of bob's changed.
    assert await stub.GetDeployment(pb.GetDeploymentRequest(id=theirs.id), metadata=bob.metadata) == theirs


async def test_admin_sees_and_manages_every_tenant(secure: SecureApi) -> None:
    stub, alice, bob, root = secure.stub, secure.user("alice"), secure.user("bob"), secure.user("root", admin=True)
    a = await stub.CreateAppHostingDeployment(create_request(deployment_name="a"), metadata=alice.metadata)
    b = await stub.CreateAppHostingDeployment(create_request(deployment_name="b"), metadata=bob.metadata)

    listed = await stub.ListDeployments(pb.ListDeploymentsRequest(), metadata=root.metadata)
    assert {d.id for d in listed.deployments} == {a.id, b.id}
    assert await stub.GetDeployment(pb.GetDeploymentRequest(id=b.id), metadata=root.metadata) == b
    first = await anext(aiter(stub.WatchDeployment(pb.WatchDeploymentRequest(id=a.id), metadata=root.metadata)))
    assert first.deployment.id == a.id

    # The admin's watch over all deployments hears every tenant; alice's hears only hers.
    admin_watch = stub.WatchDeployments(pb.WatchDeploymentsRequest(), metadata=root.metadata)
    alice_watch = stub.WatchDeployments(pb.WatchDeploymentsRequest(), metadata=alice.metadata)
    await asyncio.sleep(0.2)  # both streams registered before the changes below
    deleted = await stub.DeleteDeployment(pb.DeleteDeploymentRequest(id=b.id), metadata=root.metadata)
    assert deleted.status == pb.DEPLOYMENT_STATUS_DELETING
    await stub.DeleteDeployment(pb.DeleteDeploymentRequest(id=a.id), metadata=alice.metadata)
    heard_by_admin = [await anext(aiter(admin_watch)) for _ in range(2)]
    assert {c.deployment.id for c in heard_by_admin} == {a.id, b.id}
    heard_by_alice = await anext(aiter(alice_watch))
    assert heard_by_alice.deployment.id == a.id
    admin_watch.cancel()
    alice_watch.cancel()

    # An admin's own creations are the admin's.
    own = await stub.CreateAppHostingDeployment(create_request(deployment_name="ops"), metadata=root.metadata)
    assert own.user_id == root.id


async def test_create_delete_and_retry_record_the_acting_user(secure: SecureApi) -> None:
    stub, alice, root = secure.stub, secure.user("alice"), secure.user("root", admin=True)
    watch = stub.WatchDeployments(pb.WatchDeploymentsRequest(), metadata=root.metadata)
    await asyncio.sleep(0.2)
    created = await stub.CreateAppHostingDeployment(create_request(), metadata=alice.metadata)
    await stub.DeleteDeployment(pb.DeleteDeploymentRequest(id=created.id), metadata=root.metadata)
    events = [(await anext(aiter(watch))).event for _ in range(2)]
    watch.cancel()
    assert [(e.revision, e.actor) for e in events] == [(1, alice.id), (2, root.id)]

    # The event log keeps the actor, and a resumed watch replays it.
    rows = await secure.server.store.events_after(created.id, 0)
    assert [(row.revision, row.actor) for row in rows] == [(1, alice.id), (2, root.id)]
    replayed = stub.WatchDeployment(pb.WatchDeploymentRequest(id=created.id, since_revision=1), metadata=alice.metadata)
    assert (await anext(aiter(replayed))).event.actor == root.id
    replayed.cancel()


async def test_retry_records_its_actor(secure: SecureApi) -> None:
    stub, alice = secure.stub, secure.user("alice")
    created = await stub.CreateAppHostingDeployment(create_request(), metadata=alice.metadata)
    await secure.server.store.apply(
        created.id, EventInput(event_id="t:fail", status="failed", phase="app", message="boom", source="test")
    )
    retried = await stub.RetryDeployment(pb.RetryDeploymentRequest(id=created.id), metadata=alice.metadata)
    assert retried.status == pb.DEPLOYMENT_STATUS_PENDING
    events = await secure.server.store.events_after(created.id, 0)
    assert [(e.status, e.actor) for e in events] == [("pending", alice.id), ("failed", None), ("pending", alice.id)]


def _pem(private: Any) -> tuple[bytes, bytes]:
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


@pytest.mark.parametrize(
    ("algorithm", "make_key"),
    [
        ("RS256", lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        ("ES256", lambda: ec.generate_private_key(ec.SECP256R1())),
    ],
)
async def test_public_key_tokens(secure_api_factory: ApiFactory, tmp_path: Path, algorithm: str, make_key: Any) -> None:
    private, public = _pem(make_key())
    key_file = tmp_path / "jwt.pub"
    key_file.write_bytes(public)
    verifier = JwtVerifier.from_files(public_key_file=str(key_file))
    assert verifier.algorithms == [algorithm]
    api = await secure_api_factory(auth=verifier)
    user = str(uuid.uuid4())
    good = bearer(token_for(user, key=private, algorithm=algorithm))
    created = await api.stub.CreateAppHostingDeployment(create_request(), metadata=good)
    assert created.user_id == user
    # The HS256 secret is no key here, and a token signed by another private key is refused.
    await _unauthenticated(
        api.stub.ListDeployments(pb.ListDeploymentsRequest(), metadata=bearer(token_for(user, key=SECRET))),
        "TOKEN_INVALID",
    )
    stranger, _ = _pem(make_key())
    await _unauthenticated(
        api.stub.ListDeployments(
            pb.ListDeploymentsRequest(), metadata=bearer(token_for(user, key=stranger, algorithm=algorithm))
        ),
        "TOKEN_INVALID",
    )


def test_weak_keys_are_refused(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("too-short\n")
    with pytest.raises(ValueError, match="at least 32 bytes"):
        JwtVerifier.from_files(secret_file=str(short))
    _, small_rsa = _pem(rsa.generate_private_key(public_exponent=65537, key_size=1024))
    with pytest.raises(ValueError, match="2048"):
        JwtVerifier.from_public_key(small_rsa)
    with pytest.raises(ValueError, match="exactly one"):
        JwtVerifier.from_files()
