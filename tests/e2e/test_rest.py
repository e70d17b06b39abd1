"""The REST gateway over real HTTP, in front of the real API, scheduler and simulated provisioner."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from apphosting.nats_server import NatsServer
from apphosting_cli.rest import RestGateway, RestOptions
from apphosting_client import ClientConfig
from services.deployments.app import ApiOptions, ApiServer
from services.deployments.auth import JwtVerifier, mint_token
from services.deployments.quotas import UNLIMITED
from tests.support.stack import Stack

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "create-deployment.json"
SECRET = b"a-secret-of-the-rest-tests-longer-than-32-bytes"

Event = dict[str, Any]


async def public_resolver(host: str) -> Sequence[str]:
    # A public address for every name, so helm_repo_url is judged without the machine's DNS.
    return ["93.184.216.34"]


async def serve_gateway(api_port: int) -> RestGateway:
    gateway = RestGateway(RestOptions(listen="127.0.0.1:0", client=ClientConfig(address=f"127.0.0.1:{api_port}")))
    await gateway.start()
    return gateway


@pytest.fixture
async def rest(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    await stack.add_api(resolver=public_resolver)
    stack.add_scheduler()
    stack.add_provisioner()
    gateway = await serve_gateway(stack.apis[0].port)
    try:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
            yield http
    finally:
        await gateway.stop()


def body(name: str, **fields: Any) -> dict[str, Any]:
    return {
        "geographic_region": "eu",
        "deployment_name": name,
        "app_type": "web_app",
        "docker_image": "ghcr.io/acme/web:1.0.0",
        "cpu_request": 0.5,
        "memory_request_mb": 512,
        **fields,
    }


async def events(
    http: httpx.AsyncClient,
    deployment_id: str,
    done: Callable[[Event], bool],
    headers: dict[str, str] | None = None,
) -> list[tuple[int, Event]]:
    """Reads the SSE stream until `done` holds for a deployment or the stream ends; (id, data) of each event."""
    seen: list[tuple[int, Event]] = []
    event_id = 0
    async with http.stream("GET", f"/deployments/{deployment_id}/events", headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if line.startswith("id: "):
                event_id = int(line[4:])
            elif line.startswith("event: error"):
                raise AssertionError("the stream reported an error")
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                seen.append((event_id, data))
                if done(data["deployment"]) or (data["event"] or {}).get("final"):
                    break
    return seen


def at_rest(status: str, release: int | None = None) -> Callable[[Event], bool]:
    def check(deployment: Event) -> bool:
        return (
            deployment["status"] == status
            and not deployment["reconciling"]
            and (release is None or deployment["healthy_release"] == release)
        )

    return check


async def running(http: httpx.AsyncClient, name: str, **fields: Any) -> Event:
    created = await http.post("/deployments/app-hosting", json=body(name, **fields))
    assert created.status_code == 201, created.text
    seen = await events(http, created.json()["id"], at_rest("running", 1))
    deployment: Event = seen[-1][1]["deployment"]
    assert deployment["status"] == "running", deployment
    return deployment


async def test_the_reference_example_is_created_and_runs(rest: httpx.AsyncClient) -> None:
    # The example body byte for byte, as `curl --data @examples/create-deployment.json` sends it.
    answer = await rest.post(
        "/deployments/app-hosting", content=EXAMPLE.read_bytes(), headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == 201, answer.text
    created = answer.json()
    for key in ("id", "user_id", "cluster_id"):
        uuid.UUID(created[key])
    assert created["name"] == "shop-frontend"
    assert created["app_type"] == "helm"
    assert created["status"] == "pending"
    assert created["is_adopted"] is False
    assert created["cpu_request"] == 0.5
    assert created["memory_request_mb"] == 512
    assert created["helm_chart_name"] == "nginx"
    assert created["config"] == {"team": "web", "tier": "frontend"}
    assert datetime.fromisoformat(created["created_at"]).tzinfo is not None
    assert answer.headers["ETag"] == f'"{created["etag"]}"'

    seen = await events(rest, created["id"], at_rest("running", 1))
    statuses = [data["deployment"]["status"] for _, data in seen]
    assert statuses[0] == "pending"
    assert statuses[-1] == "running"
    assert "provisioning" in statuses
    revisions = [event_id for event_id, _ in seen]
    assert revisions == sorted(set(revisions))
    assert all(data["event"]["revision"] == event_id for event_id, data in seen[1:])

    got = await rest.get(f"/deployments/{created['id']}")
    assert got.status_code == 200
    assert got.json()["status"] == "running"
    assert got.json()["endpoint_url"]
    listed = await rest.get("/deployments", params={"skip": 0, "limit": 10})
    assert listed.status_code == 200
    assert [item["id"] for item in listed.json()] == [created["id"]]


async def test_invalid_requests_list_every_violation_in_the_reference_shape(rest: httpx.AsyncClient) -> None:
    answer = await rest.post(
        "/deployments/app-hosting",
        json=body("Not A Name!", cpu_request=-1, volumes=[{"path": "relative/path", "sizeGb": 10}]),
    )
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"]
    assert all(set(entry) == {"loc", "msg", "type"} for entry in detail)
    locations = [entry["loc"] for entry in detail]
    assert ["body", "deployment_name"] in locations
    assert ["body", "cpu_request"] in locations
    assert ["body", "volumes", 0, "path"] in locations
    assert len(locations) == len({tuple(loc) for loc in locations})
    assert all(entry["type"].isupper() and entry["msg"] for entry in detail)

    # JSON that does not fit the shape is refused before the API, in the same form.
    shape = await rest.post("/deployments/app-hosting", json={"deployment_name": "x", "replicas": "many"})
    assert shape.status_code == 422
    locations = [entry["loc"] for entry in shape.json()["detail"]]
    assert ["body", "geographic_region"] in locations
    assert ["body", "replicas"] in locations
    # An integer JSON allows but the API's int32 cannot carry.
    huge = await rest.post("/deployments/app-hosting", json=body("huge", memory_request_mb=2**40))
    assert huge.status_code == 422
    assert huge.json()["detail"][0]["loc"] == ["body", "memory_request_mb"]


async def test_unknown_ids_are_404_and_conflicts_409(rest: httpx.AsyncClient) -> None:
    missing = await rest.get(f"/deployments/{uuid.uuid4()}")
    assert missing.status_code == 404
    assert missing.json()["reason"] == "DEPLOYMENT_NOT_FOUND"
    assert set(missing.json()) == {"detail", "reason"}
    web = await running(rest, "web")
    taken = await rest.post("/deployments/app-hosting", json=body("web"))
    assert taken.status_code == 409
    assert taken.json()["reason"] == "DEPLOYMENT_NAME_TAKEN"
    stale = await rest.post(f"/deployments/{web['id']}/scale", json={"replicas": 2}, headers={"If-Match": '"r1"'})
    assert stale.status_code == 409
    not_stopped = await rest.post(f"/deployments/{web['id']}/start")
    assert not_stopped.status_code == 409


async def test_day2_operations(rest: httpx.AsyncClient) -> None:
    web = await running(rest, "web")
    deployment_id = web["id"]

    checked = await rest.patch(f"/deployments/{deployment_id}", json={"replicas": 3}, params={"validate_only": "true"})
    assert checked.status_code == 200, checked.text
    updated = await rest.patch(
        f"/deployments/{deployment_id}",
        json={"docker_image": "ghcr.io/acme/web:2.0.0", "replicas": 2},
        headers={"If-Match": f'"{web["etag"]}"'},
        params={"reason": "new version"},
    )
    assert updated.status_code == 200, updated.text
    assert updated.json()["release"] == 2
    after = (await events(rest, deployment_id, at_rest("running", 2)))[-1][1]["deployment"]
    assert after["docker_image"] == "ghcr.io/acme/web:2.0.0"
    assert after["replicas"] == 2

    bad = await rest.patch(f"/deployments/{deployment_id}", json={"cpu_request": -2})
    assert bad.status_code == 422
    assert [entry["loc"] for entry in bad.json()["detail"]] == [["body", "cpu_request"]]

    scaled = await rest.post(f"/deployments/{deployment_id}/scale", json={"replicas": 4})
    assert scaled.status_code == 200, scaled.text
    await events(rest, deployment_id, at_rest("running", 3))

    rolled = await rest.post(f"/deployments/{deployment_id}/rollback", json={"release": 1})
    assert rolled.status_code == 200, rolled.text
    back = (await events(rest, deployment_id, at_rest("running", 4)))[-1][1]["deployment"]
    assert back["docker_image"] == "ghcr.io/acme/web:1.0.0"

    stopped = await rest.post(f"/deployments/{deployment_id}/stop")
    assert stopped.status_code == 200, stopped.text
    await events(rest, deployment_id, at_rest("stopped"))
    started = await rest.post(f"/deployments/{deployment_id}/start")
    assert started.status_code == 200, started.text
    restarted = await events(rest, deployment_id, at_rest("running"))

    releases = await rest.get(f"/deployments/{deployment_id}/releases")
    assert releases.status_code == 200
    numbers = [release["number"] for release in releases.json()]
    assert numbers == sorted(numbers, reverse=True)
    assert numbers[-1] == 1
    assert releases.json()[-1]["spec"]["docker_image"] == "ghcr.io/acme/web:1.0.0"
    one = await rest.get(f"/deployments/{deployment_id}/releases", params={"skip": 1, "limit": 1})
    assert [release["number"] for release in one.json()] == [numbers[1]]

    deleted = await rest.delete(f"/deployments/{deployment_id}")
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["status"] == "deleting"
    # The stream ends by itself after the final event. Resumed from the last change seen before the
    # delete, it replays the whole teardown however far the teardown got before it was opened.
    final = await events(rest, deployment_id, lambda _: False, headers={"Last-Event-ID": str(restarted[-1][0])})
    assert final[-1][1]["event"]["final"] is True


async def test_retry_of_a_running_deployment_is_refused(rest: httpx.AsyncClient) -> None:
    web = await running(rest, "web")
    retried = await rest.post(f"/deployments/{web['id']}/retry")
    assert retried.status_code == 409
    assert "running" in retried.json()["detail"]


async def test_promote_copies_with_overrides(rest: httpx.AsyncClient) -> None:
    web = await running(rest, "web")
    target = "eu-ams3-a" if web["location_id"] != "eu-ams3-a" else "eu-fsn1-a"
    answer = await rest.post(
        f"/deployments/{web['id']}/promote",
        json={
            "target_cluster_id": target,
            "new_name": "web-staging",
            "delete_source": False,
            "overrides": {"replicas": 2, "docker_image": "ghcr.io/acme/web:1.2.0"},
        },
    )
    assert answer.status_code == 201, answer.text
    promoted = answer.json()
    assert promoted["source"]["status"] == "promoting"
    assert promoted["target"]["promoted_from"] == web["id"]
    copy = (await events(rest, promoted["target"]["id"], at_rest("running", 1)))[-1][1]["deployment"]
    assert copy["location_id"] == target
    assert copy["replicas"] == 2
    assert copy["docker_image"] == "ghcr.io/acme/web:1.2.0"
    invalid = await rest.post(f"/deployments/{web['id']}/promote", json={"overrides": {"replicas": -1}})
    assert invalid.status_code == 422
    assert ["body", "overrides", "replicas"] in [entry["loc"] for entry in invalid.json()["detail"]]


async def test_events_resume_after_the_last_event_id(rest: httpx.AsyncClient) -> None:
    web = await running(rest, "web")
    whole = await events(rest, web["id"], lambda _: True)
    assert len(whole) == 1
    assert whole[0][1]["event"] is None
    current = whole[0][0]
    scaled = await rest.post(f"/deployments/{web['id']}/scale", json={"replicas": 2})
    assert scaled.status_code == 200
    resumed = await events(rest, web["id"], at_rest("running", 2), headers={"Last-Event-ID": str(current)})
    assert resumed[0][0] == current + 1
    assert resumed[0][1]["event"]["revision"] == current + 1
    assert [event_id for event_id, _ in resumed] == list(range(current + 1, current + 1 + len(resumed)))
    bad = await rest.get(f"/deployments/{web['id']}/events", headers={"Last-Event-ID": "yesterday"})
    assert bad.status_code == 422
    gone = await rest.get(f"/deployments/{uuid.uuid4()}/events")
    assert gone.status_code == 404


async def test_bearer_tokens_are_forwarded_to_the_api(database_url: str, nats_server: NatsServer) -> None:
    api = ApiServer(
        ApiOptions(
            listen="127.0.0.1:0",
            database_url=database_url,
            nats_url=nats_server.url,
            auth=JwtVerifier.from_secret(SECRET, leeway=timedelta(0)),
            quotas=UNLIMITED,
            resolver=public_resolver,
        )
    )
    await api.start()
    gateway = await serve_gateway(api.port)
    try:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
            anonymous = await http.post("/deployments/app-hosting", json=body("web"))
            assert anonymous.status_code == 401
            assert anonymous.json()["reason"] == "TOKEN_MISSING"
            forged = await http.get("/deployments", headers={"Authorization": "Bearer not-a-token"})
            assert forged.status_code == 401
            alice = {"Authorization": f"Bearer {mint_token(SECRET, str(uuid.uuid4()))}"}
            created = await http.post("/deployments/app-hosting", json=body("web"), headers=alice)
            assert created.status_code == 201, created.text
            mine = await http.get(f"/deployments/{created.json()['id']}", headers=alice)
            assert mine.status_code == 200
            bob = {"Authorization": f"Bearer {mint_token(SECRET, str(uuid.uuid4()))}"}
            theirs = await http.get(f"/deployments/{created.json()['id']}", headers=bob)
            assert theirs.status_code == 404
            assert (await http.get("/deployments", headers=bob)).json() == []
            listed = await http.get("/deployments", headers=alice)
            assert [item["id"] for item in listed.json()] == [created.json()["id"]]
    finally:
        await gateway.stop()
        await api.stop()
