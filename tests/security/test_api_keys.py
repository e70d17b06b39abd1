"""API keys over a real channel and the REST gateway: made once, stored as a hash, expired, revoked, scoped."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import grpc
import httpx
import pytest
from google.protobuf import json_format
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sqlalchemy import text, update

from apphosting.v1 import api_keys_pb2 as kpb
from apphosting.v1 import api_keys_pb2_grpc
from apphosting.v1 import deployments_pb2 as pb
from services.deployments.api_keys import MAX_LIVE_KEYS, MAX_TTL_SECONDS
from services.deployments.tables import ApiKeyRow
from tests.e2e.test_rest import serve_gateway
from tests.e2e.test_user_cli import cli
from tests.integration.test_api import create_request, expect_error
from tests.security.conftest import ApiFactory, SecureApi, User, bearer
from tests.support.tcp_proxy import TcpProxy

T = TypeVar("T")
# Generous: the machine is shared and loaded.
DEADLINE = 60.0


@dataclass
class Keyed:
    api: SecureApi
    keys: api_keys_pb2_grpc.ApiKeyServiceAsyncStub

    async def make(self, user: User, name: str = "ci", **fields: Any) -> kpb.CreateApiKeyResponse:
        made: kpb.CreateApiKeyResponse = await self.keys.CreateApiKey(
            kpb.CreateApiKeyRequest(name=name, **fields), metadata=user.metadata
        )
        return made

    async def rows(self) -> list[dict[str, Any]]:
        """The api_keys table as stored, every column."""
        async with self.api.server.store.session() as session:
            return [dict(row) for row in (await session.execute(text("SELECT * FROM api_keys"))).mappings()]

    async def set_times(self, key_id: str, **values: datetime | None) -> None:
        async with self.api.server.store.transaction() as session:
            await session.execute(update(ApiKeyRow).where(ApiKeyRow.id == key_id).values(**values))

    async def idle(self) -> None:
        """Waits until the server's background work (last-use writes) is done."""
        await eventually(lambda: _done(not self.api.server._tasks), bool)


async def _done(value: T) -> T:
    return value


async def eventually(read: Callable[[], Awaitable[T]], wanted: Callable[[T], bool]) -> T:
    """Reads until `wanted` holds, within DEADLINE."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while True:
        value = await read()
        if wanted(value):
            return value
        assert loop.time() < deadline, f"still {value!r} after {DEADLINE} s"
        await asyncio.sleep(0.05)


@pytest.fixture
async def keyed(secure_api_factory: ApiFactory) -> AsyncIterator[Keyed]:
    api = await secure_api_factory()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{api.server.port}") as channel:
        yield Keyed(api, api_keys_pb2_grpc.ApiKeyServiceStub(channel))


async def _mine(keyed: Keyed, user: User) -> kpb.ListApiKeysResponse:
    listed: kpb.ListApiKeysResponse = await keyed.keys.ListApiKeys(kpb.ListApiKeysRequest(), metadata=user.metadata)
    return listed


async def test_a_key_acts_as_its_user_is_shown_once_and_stored_only_as_its_hash(keyed: Keyed) -> None:
    alice = keyed.api.user("alice")
    made = await keyed.make(alice, "nightly-deploys", ttl_seconds=3600)
    key = made.key
    assert key.startswith("ahk_")
    assert len(key) == len("ahk_") + 43
    assert made.api_key.prefix == key[:12]
    assert made.api_key.user_id == alice.id
    assert made.api_key.name == "nightly-deploys"
    assert made.api_key.expire_time.ToDatetime() - made.api_key.create_time.ToDatetime() == timedelta(hours=1)
    assert not made.api_key.HasField("last_used_time")
    assert not made.api_key.HasField("revoke_time")

    created = await keyed.api.stub.CreateAppHostingDeployment(create_request(), metadata=alice.metadata)
    # The key is alice: it sees her deployment, and a deployment it makes is hers.
    got = await keyed.api.stub.GetDeployment(pb.GetDeploymentRequest(id=created.id), metadata=bearer(key))
    assert got.id == created.id
    by_key = await keyed.api.stub.CreateAppHostingDeployment(
        create_request(deployment_name="api"), metadata=bearer(key)
    )
    assert by_key.user_id == alice.id

    listed = await _mine(keyed, alice)
    assert [item.id for item in listed.api_keys] == [made.api_key.id]
    assert key not in str(listed)
    assert key[12:] not in listed.SerializeToString().decode("latin-1")

    (row,) = await keyed.rows()
    assert row["key_hash"] == hashlib.sha256(key.encode()).hexdigest()
    for column, value in row.items():
        assert key[12:] not in str(value), column


async def test_each_user_lists_only_their_keys_newest_first_in_pages(keyed: Keyed) -> None:
    alice, bob = keyed.api.user("alice"), keyed.api.user("bob")
    made = [(await keyed.make(alice, f"key-{n}")).api_key.id for n in range(3)]
    await keyed.make(bob, "bob's")
    first = await keyed.keys.ListApiKeys(kpb.ListApiKeysRequest(page_size=2), metadata=alice.metadata)
    assert [item.id for item in first.api_keys] == made[::-1][:2]
    assert first.next_page_token
    rest = await keyed.keys.ListApiKeys(
        kpb.ListApiKeysRequest(page_size=2, page_token=first.next_page_token), metadata=alice.metadata
    )
    assert [item.id for item in rest.api_keys] == made[:1]
    assert not rest.next_page_token
    # A token is bound to its lister.
    stolen = keyed.keys.ListApiKeys(kpb.ListApiKeysRequest(page_token=first.next_page_token), metadata=bob.metadata)
    details = await expect_error(stolen, grpc.StatusCode.INVALID_ARGUMENT)
    assert "page_token" in details.violations


async def test_a_revoked_key_is_refused_on_the_next_call_and_revoking_again_changes_nothing(keyed: Keyed) -> None:
    alice = keyed.api.user("alice")
    made = await keyed.make(alice)
    listing = pb.ListDeploymentsRequest()
    await keyed.api.stub.ListDeployments(listing, metadata=bearer(made.key))
    revoked = await keyed.keys.RevokeApiKey(kpb.RevokeApiKeyRequest(id=made.api_key.id), metadata=alice.metadata)
    assert revoked.HasField("revoke_time")
    details = await expect_error(
        keyed.api.stub.ListDeployments(listing, metadata=bearer(made.key)), grpc.StatusCode.UNAUTHENTICATED
    )
    assert details.reason == "TOKEN_REVOKED"
    assert "revoked" in details.message
    assert made.api_key.prefix in details.message
    again = await keyed.keys.RevokeApiKey(kpb.RevokeApiKeyRequest(id=made.api_key.id), metadata=alice.metadata)
    # Unchanged: the first revoke's time stands (last_used_time may have been recorded meanwhile).
    assert again.revoke_time == revoked.revoke_time


async def test_an_expired_key_is_refused_saying_so(keyed: Keyed) -> None:
    alice = keyed.api.user("alice")
    made = await keyed.make(alice, ttl_seconds=600)
    listing = pb.ListDeploymentsRequest()
    await keyed.api.stub.ListDeployments(listing, metadata=bearer(made.key))
    # Its expiry moved into the past, as ten minutes would.
    await keyed.set_times(made.api_key.id, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    details = await expect_error(
        keyed.api.stub.ListDeployments(listing, metadata=bearer(made.key)), grpc.StatusCode.UNAUTHENTICATED
    )
    assert details.reason == "TOKEN_EXPIRED"
    assert "expired" in details.message


async def test_unknown_keys_are_unauthenticated(keyed: Keyed) -> None:
    alice = keyed.api.user("alice")
    made = await keyed.make(alice)
    for wrong in (made.key[:-1] + ("A" if made.key[-1] != "A" else "B"), "ahk_", "ahk_" + "x" * 43):
        details = await expect_error(
            keyed.api.stub.ListDeployments(pb.ListDeploymentsRequest(), metadata=bearer(wrong)),
            grpc.StatusCode.UNAUTHENTICATED,
        )
        assert details.reason == "TOKEN_INVALID"


async def test_a_read_only_key_may_read_but_not_change(keyed: Keyed) -> None:
    alice = keyed.api.user("alice")
    created = await keyed.api.stub.CreateAppHostingDeployment(create_request(), metadata=alice.metadata)
    made = await keyed.make(alice, "dashboards", read_only=True)
    reader = bearer(made.key)
    assert made.api_key.read_only
    await keyed.api.stub.GetDeployment(pb.GetDeploymentRequest(id=created.id), metadata=reader)
    await keyed.api.stub.ListDeployments(pb.ListDeploymentsRequest(), metadata=reader)
    await keyed.api.stub.ListReleases(pb.ListReleasesRequest(id=created.id), metadata=reader)
    await keyed.keys.ListApiKeys(kpb.ListApiKeysRequest(), metadata=reader)
    watch = keyed.api.stub.WatchDeployment(pb.WatchDeploymentRequest(id=created.id), metadata=reader)
    first = await anext(aiter(watch))
    assert first.deployment.id == created.id
    watch.cancel()
    writes: list[Awaitable[Any]] = [
        keyed.api.stub.CreateAppHostingDeployment(create_request(deployment_name="api"), metadata=reader),
        keyed.api.stub.DeleteDeployment(pb.DeleteDeploymentRequest(id=created.id), metadata=reader),
        keyed.api.stub.ScaleDeployment(pb.ScaleDeploymentRequest(id=created.id, replicas=2), metadata=reader),
    ]
    for write in writes:
        details = await expect_error(write, grpc.StatusCode.PERMISSION_DENIED)
        assert details.reason == "API_KEY_READ_ONLY"
        assert made.api_key.prefix in details.message
        assert "read-only" in details.message
    assert (await keyed.api.stub.GetDeployment(pb.GetDeploymentRequest(id=created.id), metadata=reader)).status == (
        created.status
    )


async def test_keys_neither_make_nor_revoke_keys_and_never_act_as_admin(keyed: Keyed) -> None:
    root, bob = keyed.api.user("root", admin=True), keyed.api.user("bob")
    bobs = await keyed.api.stub.CreateAppHostingDeployment(create_request(), metadata=bob.metadata)
    made = await keyed.make(root)
    key = bearer(made.key)
    for call in (
        keyed.keys.CreateApiKey(kpb.CreateApiKeyRequest(name="successor"), metadata=key),
        keyed.keys.RevokeApiKey(kpb.RevokeApiKeyRequest(id=made.api_key.id), metadata=key),
    ):
        details = await expect_error(call, grpc.StatusCode.PERMISSION_DENIED)
        assert details.reason == "API_KEY_NOT_ALLOWED"
    # The admin's token sees bob's deployment; the admin's key does not.
    await keyed.api.stub.GetDeployment(pb.GetDeploymentRequest(id=bobs.id), metadata=root.metadata)
    await expect_error(
        keyed.api.stub.GetDeployment(pb.GetDeploymentRequest(id=bobs.id), metadata=key), grpc.StatusCode.NOT_FOUND
    )


async def test_another_users_key_cannot_be_revoked(keyed: Keyed) -> None:
    alice, bob = keyed.api.user("alice"), keyed.api.user("bob")
    made = await keyed.make(alice)
    for who in (bob, keyed.api.user("root", admin=True)):
        details = await expect_error(
            keyed.keys.RevokeApiKey(kpb.RevokeApiKeyRequest(id=made.api_key.id), metadata=who.metadata),
            grpc.StatusCode.NOT_FOUND,
        )
        assert details.reason == "API_KEY_NOT_FOUND"
    unknown = await expect_error(
        keyed.keys.RevokeApiKey(kpb.RevokeApiKeyRequest(id=str(uuid.uuid4())), metadata=bob.metadata),
        grpc.StatusCode.NOT_FOUND,
    )
    assert unknown.message.replace(unknown.metadata["id"], "") == details.message.replace(made.api_key.id, "")
    await keyed.api.stub.ListDeployments(pb.ListDeploymentsRequest(), metadata=bearer(made.key))
    assert not (await _mine(keyed, bob)).api_keys


async def test_last_use_is_recorded_in_the_background_at_most_once_a_minute(keyed: Keyed) -> None:
    alice = keyed.api.user("alice")
    made = await keyed.make(alice)
    listing = pb.ListDeploymentsRequest()

    async def key_of_alice() -> kpb.ApiKey:
        return (await _mine(keyed, alice)).api_keys[0]

    await keyed.api.stub.ListDeployments(listing, metadata=bearer(made.key))
    used = await eventually(key_of_alice, lambda key: key.HasField("last_used_time"))
    for _ in range(5):
        await keyed.api.stub.ListDeployments(listing, metadata=bearer(made.key))
    await keyed.idle()
    assert (await key_of_alice()).last_used_time == used.last_used_time
    # A minute later (moved back, as waiting would), the next use is recorded.
    before = used.last_used_time.ToDatetime(tzinfo=UTC) - timedelta(minutes=2)
    await keyed.set_times(made.api_key.id, last_used_at=before)
    await keyed.api.stub.ListDeployments(listing, metadata=bearer(made.key))
    later = await eventually(key_of_alice, lambda key: key.last_used_time.ToDatetime(tzinfo=UTC) > before)
    assert later.last_used_time.ToDatetime(tzinfo=UTC) >= used.last_used_time.ToDatetime(tzinfo=UTC)


async def test_bad_requests_name_their_field(keyed: Keyed) -> None:
    alice = keyed.api.user("alice")
    cases: list[tuple[kpb.CreateApiKeyRequest, dict[str, str]]] = [
        (kpb.CreateApiKeyRequest(), {"name": "REQUIRED"}),
        (kpb.CreateApiKeyRequest(name="  "), {"name": "REQUIRED"}),
        (kpb.CreateApiKeyRequest(name="x" * 101), {"name": "TOO_LONG"}),
        (kpb.CreateApiKeyRequest(name="a\nb"), {"name": "INVALID_FORMAT"}),
        (kpb.CreateApiKeyRequest(name="ci", ttl_seconds=-1), {"ttl_seconds": "OUT_OF_RANGE"}),
        (kpb.CreateApiKeyRequest(name="ci", ttl_seconds=MAX_TTL_SECONDS + 1), {"ttl_seconds": "OUT_OF_RANGE"}),
        (kpb.CreateApiKeyRequest(ttl_seconds=-5), {"name": "REQUIRED", "ttl_seconds": "OUT_OF_RANGE"}),
    ]
    for request, wanted in cases:
        details = await expect_error(
            keyed.keys.CreateApiKey(request, metadata=alice.metadata), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert {field: reason for field, (reason, _) in details.violations.items()} == wanted, request
    for bad in ("", "not-an-id"):
        details = await expect_error(
            keyed.keys.RevokeApiKey(kpb.RevokeApiKeyRequest(id=bad), metadata=alice.metadata),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert set(details.violations) == {"id"}
    details = await expect_error(
        keyed.keys.ListApiKeys(kpb.ListApiKeysRequest(page_size=-1), metadata=alice.metadata),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(details.violations) == {"page_size"}
    assert not await keyed.rows()


async def test_a_user_holds_at_most_the_cap_of_live_keys_even_when_replicas_race(
    keyed: Keyed, secure_api_factory: ApiFactory
) -> None:
    alice = keyed.api.user("alice")
    made = [await keyed.make(alice, f"key-{n}") for n in range(MAX_LIVE_KEYS - 1)]
    # The last place, asked for at once through two replicas: one create gets it.
    other = await secure_api_factory()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{other.server.port}") as channel:
        elsewhere = Keyed(other, api_keys_pb2_grpc.ApiKeyServiceStub(channel))
        racing = [side.make(alice, f"race-{n}") for n in range(3) for side in (keyed, elsewhere)]
        answers = await asyncio.gather(*racing, return_exceptions=True)
    refused = [answer for answer in answers if isinstance(answer, grpc.aio.AioRpcError)]
    assert len(refused) == len(answers) - 1, answers
    assert {error.code() for error in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    details = await expect_error(keyed.make(alice, "one too many"), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert details.reason == "API_KEY_LIMIT"
    assert str(MAX_LIVE_KEYS) in details.message
    assert details.metadata["quota"] == "api_keys"
    # Neither a revoked key nor an expired one counts; another user has their own cap.
    await keyed.keys.RevokeApiKey(kpb.RevokeApiKeyRequest(id=made[0].api_key.id), metadata=alice.metadata)
    await keyed.make(alice, "replacement")
    await keyed.set_times(made[1].api_key.id, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    await keyed.make(alice, "another replacement")
    await expect_error(keyed.make(alice, "one too many"), grpc.StatusCode.RESOURCE_EXHAUSTED)
    await keyed.make(keyed.api.user("bob"))


async def test_rest_makes_lists_and_revokes_keys_and_takes_a_key_on_every_route(keyed: Keyed) -> None:
    gateway = await serve_gateway(keyed.api.server.port)
    alice = keyed.api.user("alice")
    token = {"Authorization": dict(alice.metadata)["authorization"]}
    try:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
            made = await http.post(
                "/api-keys", json={"name": "ci", "read_only": False, "ttl_seconds": 0}, headers=token
            )
            assert made.status_code == 201, made.text
            body = made.json()
            key, key_id = body["key"], body["id"]
            assert key.startswith("ahk_")
            assert body["prefix"] == key[:12]
            assert body["expire_time"] is None
            listed = await http.get("/api-keys", headers=token)
            assert listed.status_code == 200
            assert [item["id"] for item in listed.json()] == [key_id]
            assert key not in listed.text
            assert "key" not in listed.json()[0]

            with_key = {"Authorization": f"Bearer {key}"}
            created = await http.post(
                "/deployments/app-hosting",
                json=json_format.MessageToDict(create_request(), preserving_proto_field_name=True),
                headers=with_key,
            )
            assert created.status_code == 201, created.text
            assert created.json()["user_id"] == alice.id
            assert (await http.get(f"/deployments/{created.json()['id']}", headers=with_key)).status_code == 200
            assert (await http.get("/api-keys", headers=with_key)).status_code == 200
            refused = await http.post("/api-keys", json={"name": "successor"}, headers=with_key)
            assert refused.status_code == 403
            assert refused.json()["reason"] == "API_KEY_NOT_ALLOWED"

            surrogate = await http.post(
                "/api-keys", content='{"name": "\\ud800"}', headers={**token, "Content-Type": "application/json"}
            )
            assert surrogate.status_code == 422
            assert surrogate.json()["detail"][0]["loc"] == ["body", "name"]
            bad = await http.post("/api-keys", json={"name": "", "ttl_seconds": -1}, headers=token)
            assert bad.status_code == 422
            assert {tuple(entry["loc"]) for entry in bad.json()["detail"]} == {
                ("body", "name"),
                ("body", "ttl_seconds"),
            }
            assert (await http.delete("/api-keys/nope", headers=token)).json()["detail"][0]["loc"] == ["path", "key_id"]

            revoked = await http.delete(f"/api-keys/{key_id}", headers=token)
            assert revoked.status_code == 200
            assert revoked.json()["revoke_time"] is not None
            gone = await http.get("/deployments", headers=with_key)
            assert gone.status_code == 401
            assert gone.json()["reason"] == "TOKEN_REVOKED"
            other = await http.delete(f"/api-keys/{key_id}", headers={"Authorization": f"Bearer {_token(keyed)}"})
            assert other.status_code == 404
    finally:
        await gateway.stop()


def _token(keyed: Keyed) -> str:
    return dict(keyed.api.user("bob").metadata)["authorization"].removeprefix("Bearer ")


async def test_the_user_cli_makes_lists_and_revokes_keys(keyed: Keyed) -> None:
    port = keyed.api.server.port
    token = _token(keyed)
    made = await cli(port, "api-keys", "create", "ci", "--read-only", "--ttl", "3600", "--token", token)
    assert made.code == 0, made
    key = made.out.strip()
    assert key.startswith("ahk_")
    assert "read-only" in made.err
    listed = await cli(port, "api-keys", "list", "-o", "json", "--token", token)
    assert listed.code == 0, listed
    (item,) = json.loads(listed.out)
    assert item["prefix"] == key[:12]
    assert key not in listed.out
    # The key itself works as the CLI's credential, read-only.
    assert (await cli(port, "list", "--token", key)).code == 0
    refused = await cli(port, "api-keys", "create", "successor", "--token", key)
    assert refused.code == 1
    assert "PERMISSION_DENIED" in refused.err
    revoked = await cli(port, "api-keys", "revoke", item["id"], "--token", token)
    assert revoked.code == 0, revoked
    gone = await cli(port, "list", "--token", key)
    assert gone.code == 1
    assert "revoked" in gone.err


async def test_reflection_lists_the_key_service(keyed: Keyed) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keyed.api.server.port}") as channel:
        reflection: Any = reflection_pb2_grpc.ServerReflectionStub(channel)  # type: ignore[arg-type]
        async for response in reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        ):
            names = {service.name for service in response.list_services_response.service}
            assert "apphosting.v1.ApiKeyService" in names


async def test_keys_are_unavailable_not_refused_while_the_database_is_down(
    proxied_database: tuple[str, TcpProxy], secure_api_factory: ApiFactory
) -> None:
    url, proxy = proxied_database
    api = await secure_api_factory(database_url=url)
    alice = api.user("alice")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{api.server.port}") as channel:
        keyed = Keyed(api, api_keys_pb2_grpc.ApiKeyServiceStub(channel))
        made = await keyed.make(alice)
        listing = pb.ListDeploymentsRequest()
        await proxy.cut()
        # The key may be good: a caller told UNAVAILABLE retries, one told UNAUTHENTICATED gives up.
        for call in (
            api.stub.ListDeployments(listing, metadata=bearer(made.key)),
            keyed.keys.ListApiKeys(kpb.ListApiKeysRequest(), metadata=alice.metadata),
            keyed.keys.CreateApiKey(kpb.CreateApiKeyRequest(name="during"), metadata=alice.metadata),
            keyed.keys.RevokeApiKey(kpb.RevokeApiKeyRequest(id=made.api_key.id), metadata=alice.metadata),
        ):
            details = await expect_error(call, grpc.StatusCode.UNAVAILABLE)
            assert details.reason == "BACKEND_UNAVAILABLE"
        await proxy.start()
        await api.stub.ListDeployments(listing, metadata=bearer(made.key))
