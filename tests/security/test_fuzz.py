"""Fuzzing the create call through a real channel: malformed requests are INVALID_ARGUMENT, never UNKNOWN or
INTERNAL; nothing is written; the server stays up. One server (in its own thread) serves every example."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apphosting.settings import Limits
from apphosting.v1 import deployments_pb2 as pb
from apphosting.v1 import deployments_pb2_grpc
from services.deployments.app import ApiOptions, ApiServer
from services.deployments.auth import JwtVerifier
from services.deployments.quotas import UNLIMITED
from services.deployments.validation import SpecInvalid, validate_create
from tests.security.conftest import SECRET, bearer, stub_resolver, token_for
from tests.support.grpc_errors import details_of

EXAMPLES = 1200
VALID: dict[str, Any] = {
    "geographic_region": "eu",
    "deployment_name": "web",
    "app_type": "web_app",
    "docker_image": "nginx:1.27",
}
REGIONS = ("eu", "us", "asia")

text = st.text(max_size=40)
int32 = st.integers(-(2**31), 2**31 - 1)


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"x": value}
    return value


def _not_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return True
    return False


# Each strategy yields (field, value) pairs that break a rule by construction.
BREAKERS: list[st.SearchStrategy[tuple[str, Any]]] = [
    st.tuples(st.just("geographic_region"), text.filter(lambda t: t not in REGIONS)),
    st.tuples(st.just("deployment_name"), st.text(min_size=1, max_size=60).map(lambda t: t + "_")),
    st.tuples(st.just("deployment_name"), st.text(min_size=54, max_size=80, alphabet="abc")),
    st.tuples(st.just("app_type"), text.filter(lambda t: t not in ("web_app", "api", "static_site", "container"))),
    st.tuples(st.just("deployment_type"), text.filter(lambda t: t != "docker")),
    st.tuples(
        st.just("cpu_request"),
        st.one_of(
            st.floats(max_value=0),
            st.floats(min_value=16.001),
            st.just(float("nan")),
            st.just(0.0005),
        ),
    ),
    st.tuples(st.just("memory_request_mb"), st.one_of(st.integers(-(2**31), 63), st.integers(65_537, 2**31 - 1))),
    st.tuples(st.just("replicas"), st.one_of(st.integers(-(2**31), 0), st.integers(21, 2**31 - 1))),
    st.tuples(st.just("container_port"), st.one_of(st.integers(-(2**31), 0), st.integers(65_536, 2**31 - 1))),
    st.tuples(st.just("storage_size_gb"), st.one_of(st.integers(-(2**31), 0), st.integers(1025, 2**31 - 1))),
    st.tuples(st.just("run_as_uid"), st.integers(-(2**63), 0)),
    st.tuples(st.just("environment_variables"), st.lists(text.filter(lambda t: "=" not in t), min_size=1, max_size=3)),
    st.tuples(
        st.just("environment_variables"), st.lists(st.text(max_size=10).map(lambda t: "9" + t + "=x"), min_size=1)
    ),
    st.tuples(st.just("docker_image"), text.map(lambda t: "Bad//" + t)),
    st.tuples(
        st.just("volumes"),
        st.lists(
            st.fixed_dictionaries(
                {"path": st.one_of(text.filter(lambda t: not t.startswith("/")), st.sampled_from(["/proc", "/"]))}
            ),
            min_size=1,
            max_size=3,
        ),
    ),
    st.tuples(
        st.just("volumes"),
        st.lists(
            st.fixed_dictionaries({"path": st.just("/d"), "sizeGb": int32.filter(lambda n: not 1 <= n <= 1024)}),
            min_size=1,
            max_size=2,
        ),
    ),
    st.tuples(
        st.just("helm_repo_url"),
        st.one_of(
            text.map(lambda t: "http://" + t),
            text.map(lambda t: "ftp://" + t),
            st.sampled_from(
                [
                    "https://127.0.0.1",
                    "https://169.254.169.254/",
                    "oci://10.0.0.1/x",
                    "https://[::1]/",
                    "https://charts.internal.test",
                    "https://u:p@charts.example.com",
                ]
            ),
        ),
    ),
    st.tuples(
        st.just("custom_values_yaml"),
        st.one_of(
            text.map(lambda t: "- " + t),
            st.just("a: &a [*a]"),
            st.integers(65, 200).map(lambda n: "a: " + "[" * n + "]" * n),
            st.just("a: [unclosed"),
        ),
    ),
    st.tuples(
        st.just("image_update_strategy"),
        text.filter(lambda t: t not in ("semver", "newest-build", "alphabetical", "digest")),
    ),
    st.tuples(st.just("image_allow_tags"), text.filter(lambda t: t != "any" and not t.startswith("regexp:"))),
    st.tuples(st.just("kubernetes_version"), text),
    st.tuples(st.just("config"), st.integers(33, 45).map(_nested)),
    st.tuples(st.just("request_id"), text.filter(lambda t: t != "").filter(_not_uuid)),
]


@st.composite
def malformed(draw: st.DrawFn) -> tuple[str, bytes]:
    """A create request that breaks at least one rule, as ('message', bytes) or ('raw', random bytes)."""
    if draw(st.integers(0, 9)) == 0:
        return "raw", draw(st.binary(max_size=200))
    body = dict(VALID)
    # Valid noise first, so that it never overwrites a breaker.
    body.update(
        draw(st.dictionaries(st.sampled_from(["replicas", "container_port", "cpu_request"]), st.integers(1, 8)))
    )
    for field, value in draw(st.lists(st.one_of(*BREAKERS), min_size=1, max_size=3)):
        body[field] = value
    # Set directly: JSON has no NaN, and request_id is not a contract field.
    direct = {name: body.pop(name) for name in ("request_id", "cpu_request") if name in body}
    message = json_format.ParseDict(body, pb.CreateAppHostingDeploymentRequest())
    for name, value in direct.items():
        setattr(message, name, value)
    return "message", message.SerializeToString()


def _locally_valid(payload: bytes) -> bool:
    """True only for bytes that decode to a request our validator accepts (the raw fuzz may hit one)."""
    from services.deployments.convert import request_to_data

    try:
        request = pb.CreateAppHostingDeploymentRequest.FromString(payload)
        data = request_to_data(request)
        if request.request_id and _not_uuid(request.request_id):
            return False
        validate_create(data, limits=Limits(), regions=REGIONS)
    except SpecInvalid:
        return False
    except Exception:
        return False
    return True


class ServerThread:
    """The API on its own event loop, so the (synchronous) hypothesis test can call it over a real channel."""

    def __init__(self, directory: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server = ApiServer(
            ApiOptions(
                listen="127.0.0.1:0",
                database_url=f"sqlite+aiosqlite:///{directory / 'fuzz.db'}",
                nats_url=None,
                auth=JwtVerifier.from_secret(SECRET),
                quotas=UNLIMITED,
                resolver=stub_resolver,
            )
        )

    def run(self, coroutine: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout=60)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        self.run(self.server.start())
        return self

    def __exit__(self, *_: object) -> None:
        self.run(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()

    async def _rows(self) -> int:
        from sqlalchemy import func, select

        from services.deployments.tables import DeploymentRow, OutboxRow

        async with self.server.store.session() as session:
            deployments = await session.scalar(select(func.count()).select_from(DeploymentRow)) or 0
            outbox = await session.scalar(select(func.count()).select_from(OutboxRow)) or 0
            return deployments + outbox

    def rows(self) -> int:
        count: int = self.run(self._rows())
        return count


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    with ServerThread(tmp_path_factory.mktemp("fuzz")) as server:
        yield server


@pytest.fixture(scope="module")
def raw_create(fuzz_server: ServerThread) -> Iterator[Any]:
    with grpc.insecure_channel(f"127.0.0.1:{fuzz_server.server.port}") as channel:
        yield channel.unary_unary("/apphosting.v1.DeploymentService/CreateAppHostingDeployment")


METADATA = bearer(token_for(str(uuid.uuid4())))
SEEN: dict[str, int] = {}


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much],
    database=None,
)
@given(request=malformed())
def test_malformed_requests_are_invalid_argument(raw_create: Any, request: tuple[str, bytes]) -> None:
    kind, payload = request
    if kind == "raw" and _locally_valid(payload):
        return
    with pytest.raises(grpc.RpcError) as raised:
        raw_create(payload, metadata=METADATA, timeout=10)
    error: Any = raised.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    reason = _reason(error)
    assert reason in ("INVALID_REQUEST", "MALFORMED_REQUEST"), reason
    SEEN[reason] = SEEN.get(reason, 0) + 1


def _reason(error: Any) -> str:
    class _Aio:
        # details_of reads an aio error; the sync one has the same accessors.
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def code(self) -> Any:
            return self.inner.code()

        def details(self) -> Any:
            return self.inner.details()

        def trailing_metadata(self) -> Any:
            return self.inner.trailing_metadata()

    return details_of(_Aio(error)).reason  # type: ignore[arg-type]


def test_after_the_fuzz_nothing_is_written_and_the_server_is_up(fuzz_server: ServerThread) -> None:
    assert sum(SEEN.values()) >= EXAMPLES * 0.8, SEEN
    print(f"fuzz answers by reason: {SEEN}")
    assert fuzz_server.rows() == 0
    with grpc.insecure_channel(f"127.0.0.1:{fuzz_server.server.port}") as channel:
        health: Any = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        stub: Any = deployments_pb2_grpc.DeploymentServiceStub(channel)
        created = stub.CreateAppHostingDeployment(
            json_format.ParseDict(VALID, pb.CreateAppHostingDeploymentRequest()), metadata=METADATA, timeout=10
        )
        assert created.status == pb.DEPLOYMENT_STATUS_PENDING


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["s", "f", "x"]), inner, max_size=3),
    max_leaves=8,
)


def _with_checksum(body: bytes) -> str:
    """A token with a correct checksum around any body, as someone who read the code could make one."""
    from services.deployments import paging

    return base64.urlsafe_b64encode(paging._checksum(body) + body).decode().rstrip("=")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], database=None)
@given(
    token=st.one_of(
        st.text(min_size=1, max_size=80),
        st.binary(min_size=1, max_size=80).map(lambda b: base64.urlsafe_b64encode(b).decode()),
        JSON.map(lambda value: _with_checksum(json.dumps(value).encode())),
        st.integers().map(lambda n: _with_checksum(json.dumps({"s": n, "f": "0" * 16}).encode())),
    )
)
def test_any_page_token_but_an_issued_one_is_invalid_argument(fuzz_server: ServerThread, token: str) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{fuzz_server.server.port}") as channel:
        stub: Any = deployments_pb2_grpc.DeploymentServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.ListDeployments(pb.ListDeploymentsRequest(page_token=token), metadata=METADATA, timeout=10)
    error: Any = raised.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    assert _reason(error) == "INVALID_REQUEST"
