"""Every answer is readable by a default client: no UNKNOWN, no Python text, bounded errors, tamper-evident
page tokens and List pages that fit a default client's message limit."""

from __future__ import annotations

import base64
import json
import logging
import uuid
from typing import Any
from urllib.parse import quote

import grpc
import pytest

from apphosting.v1 import deployments_pb2 as pb
from services.deployments import errors, paging
from tests.integration.test_api import create_request, expect_error
from tests.security.conftest import ApiFactory, SecureApi, User
from tests.support.grpc_errors import Details, details_of, metadata_wire_bytes

# A default client's soft limit on metadata; above it a client refuses answers at random, at twice it always.
CLIENT_METADATA_LIMIT = 8 * 1024

# What an answer must never carry: the exception's type, its text, a file or a traceback.
SECRET_TEXT = "boom-detail-that-must-stay-in-the-log"
PYTHON_TEXT = ("Traceback", "RuntimeError", SECRET_TEXT, ".py", "Exception")


class _Boom(RuntimeError):
    pass


async def _boom(*args: Any, **kwargs: Any) -> Any:
    raise _Boom(SECRET_TEXT)


def _assert_internal(details: Any, caplog: pytest.LogCaptureFixture) -> None:
    assert details.reason == "INTERNAL_ERROR"
    correlation_id = details.metadata["correlation_id"]
    assert correlation_id in details.message
    assert not any(text in details.message or text in str(details.metadata) for text in PYTHON_TEXT), details
    logged = [r for r in caplog.records if correlation_id in r.getMessage()]
    assert logged, "the correlation id is not in the log"
    assert logged[0].exc_info is not None
    assert SECRET_TEXT in str(logged[0].exc_info[1])


async def test_an_unexpected_failure_is_internal_with_a_correlation_id_in_answer_and_log(
    secure: SecureApi, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    alice = secure.user("alice")
    created = await secure.stub.CreateAppHostingDeployment(create_request(), metadata=alice.metadata)
    monkeypatch.setattr(secure.server.store, "get", _boom)
    unary = await expect_error(
        secure.stub.GetDeployment(pb.GetDeploymentRequest(id=created.id), metadata=alice.metadata),
        grpc.StatusCode.INTERNAL,
    )
    _assert_internal(unary, caplog)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in secure.stub.WatchDeployment(pb.WatchDeploymentRequest(id=created.id), metadata=alice.metadata):
            pass
    streaming = details_of(raised.value)
    assert streaming.code == grpc.StatusCode.INTERNAL
    _assert_internal(streaming, caplog)
    assert streaming.metadata["correlation_id"] != unary.metadata["correlation_id"]


async def test_a_failure_in_authentication_is_internal_too(
    secure: SecureApi, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    alice = secure.user("alice")
    verifier = secure.server.options.auth
    monkeypatch.setattr(verifier, "verify", lambda token: (_ for _ in ()).throw(_Boom(SECRET_TEXT)))
    details = await expect_error(
        secure.stub.ListDeployments(pb.ListDeploymentsRequest(), metadata=alice.metadata), grpc.StatusCode.INTERNAL
    )
    _assert_internal(details, caplog)


async def _finish(call: Any) -> None:
    """Awaits a unary call, or reads a stream to its end."""
    if hasattr(call, "__aiter__"):
        async for _ in call:
            pass
    else:
        await call


async def _readable_refusal(call: Any) -> Details:
    """The INVALID_ARGUMENT a call ends with, checked to fit a default client's metadata limit."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _finish(call)
    details = details_of(raised.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert metadata_wire_bytes(raised.value) < CLIENT_METADATA_LIMIT * 0.8
    return details


def _forged(body: bytes) -> str:
    """A token with a correct checksum around any body: what someone who read this code could make."""
    return base64.urlsafe_b64encode(paging._checksum(body) + body).decode().rstrip("=")


async def test_forged_and_foreign_page_tokens_are_invalid_argument(secure: SecureApi) -> None:
    alice, bob = secure.user("alice"), secure.user("bob")
    for n in range(3):
        await secure.stub.CreateAppHostingDeployment(create_request(deployment_name=f"p{n}"), metadata=alice.metadata)
    page = await secure.stub.ListDeployments(pb.ListDeploymentsRequest(page_size=1), metadata=alice.metadata)
    token = page.next_page_token
    following = await secure.stub.ListDeployments(
        pb.ListDeploymentsRequest(page_size=1, page_token=token), metadata=alice.metadata
    )
    assert len(following.deployments) == 1

    key = paging.filter_key(alice.id, [], "")
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[-5] ^= 0x01
    edited = base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")

    def body(position: Any) -> bytes:
        return json.dumps({"s": position, "f": key}).encode()

    forged = {
        "2^63": _forged(body(2**63)),
        "2^64": _forged(body(2**64)),
        "true": _forged(body(True)),
        "-1": _forged(body(-1)),
        "0": _forged(body(0)),
        "a float": _forged(body(1.5)),
        "a string": _forged(body("7")),
        "extra keys": _forged(json.dumps({"s": 1, "f": key, "x": 1}).encode()),
        "not an object": _forged(b"[1]"),
        "unchecked 2^63": base64.urlsafe_b64encode(body(2**63)).decode(),
        "an edited byte": edited,
        "garbage": "garbage!",
        "huge": "A" * 100_000,
    }
    for what, forgery in forged.items():
        details = await expect_error(
            secure.stub.ListDeployments(pb.ListDeploymentsRequest(page_token=forgery), metadata=alice.metadata),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert details.violations["page_token"][0] == "INVALID_PAGE_TOKEN", what
    foreign: list[tuple[str, pb.ListDeploymentsRequest, User]] = [
        ("another filter", pb.ListDeploymentsRequest(page_token=token, geographic_region="us"), alice),
        (
            "another status filter",
            pb.ListDeploymentsRequest(page_token=token, statuses=[pb.DEPLOYMENT_STATUS_PENDING]),
            alice,
        ),
        ("another user", pb.ListDeploymentsRequest(page_token=token), bob),
    ]
    for what, request, user in foreign:
        details = await expect_error(
            secure.stub.ListDeployments(request, metadata=user.metadata), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert details.violations["page_token"][0] == "INVALID_PAGE_TOKEN", what


async def test_oversized_values_are_answered_invalid_argument_to_a_default_client(secure: SecureApi) -> None:
    alice = secure.user("alice")
    huge_id = "9" * 10_000
    for call in (
        secure.stub.GetDeployment(pb.GetDeploymentRequest(id=huge_id), metadata=alice.metadata),
        secure.stub.DeleteDeployment(pb.DeleteDeploymentRequest(id=huge_id), metadata=alice.metadata),
        secure.stub.RetryDeployment(pb.RetryDeploymentRequest(id=huge_id), metadata=alice.metadata),
        secure.stub.WatchDeployment(pb.WatchDeploymentRequest(id=huge_id), metadata=alice.metadata),
    ):
        details = await _readable_refusal(call)
        assert "id" in details.violations
    # Non-ASCII grows threefold in grpc-message and in the details' base64 as well.
    for field, value in (
        ("app_type", "x" * 20_000),
        ("geographic_region", "é" * 20_000),
        ("request_id", "ü" * 20_000),
        ("deployment_name", "名" * 20_000),
    ):
        details = await _readable_refusal(
            secure.stub.CreateAppHostingDeployment(create_request(**{field: value}), metadata=alice.metadata)
        )
        assert field in details.violations, (field, details.violations.keys())
    assert await secure.rows() == 0


async def test_hundreds_of_violations_fit_and_say_how_many_are_not_listed(secure: SecureApi) -> None:
    alice = secure.user("alice")
    request = create_request(
        environment_variables=[f"9{n}{'ñ' * 200}=v" for n in range(400)],
        volumes=[{"path": f"relative-{n}-{'x' * 2_000}"} for n in range(40)],
        deployment_name="_" * 5_000,
    )
    details = await _readable_refusal(secure.stub.CreateAppHostingDeployment(request, metadata=alice.metadata))
    assert "environment_variables[0]" in details.violations
    listed = len(details.violations)
    not_listed = int(details.metadata["violations_not_listed"])
    assert listed >= 1
    assert listed + not_listed >= 440
    assert details.message.startswith(f"the request has {listed + not_listed} invalid fields")
    assert await secure.rows() == 0


def test_no_error_a_handler_can_make_exceeds_a_default_clients_limit() -> None:
    worst = [
        errors.invalid_argument(
            errors.FieldViolation("名" * 5_000 + str(n), "é" * 5_000, "R" * 500) for n in range(500)
        ),
        errors.ServiceError(
            grpc.StatusCode.NOT_FOUND,
            "X" * 1_000,
            "ü" * 10_000,
            metadata={f"{'k' * 300}{n}": "名" * 5_000 for n in range(50)},
            violations=(errors.FieldViolation("f", "d", "r"),) * 3,
        ),
    ]
    for error in worst:
        status = error.to_status()
        sent = [
            (key, base64.b64encode(value if isinstance(value, bytes) else value.encode()))
            for key, value in status.trailing_metadata
        ]
        sent.append(("grpc-message", quote(status.details, safe=" ").encode()))
        assert sum(len(key) + len(value) + 32 for key, value in sent) < CLIENT_METADATA_LIMIT * 0.6


async def test_config_nested_past_protobufs_limit_names_config(secure: SecureApi) -> None:
    alice = secure.user("alice")
    nested: dict[str, Any] = {}
    for _ in range(150):
        nested = {"x": nested}
    request = create_request()
    request.config.update(nested)
    details = await expect_error(
        secure.stub.CreateAppHostingDeployment(request, metadata=alice.metadata), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert details.reason == "MALFORMED_REQUEST"
    assert details.violations["config"][0] == "TOO_DEEP"
    # A body that fails for another reason names no field it cannot know.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{secure.server.port}") as channel:
        raw: Any = channel.unary_unary("/apphosting.v1.DeploymentService/CreateAppHostingDeployment")
        details = await expect_error(raw(b"\xff\xff\xff", metadata=alice.metadata), grpc.StatusCode.INVALID_ARGUMENT)
    assert details.reason == "MALFORMED_REQUEST"
    assert not details.violations
    assert await secure.rows() == 0


def _maximum_size_request(n: int) -> pb.CreateAppHostingDeploymentRequest:
    """A valid request at the size limits: environment 256 KiB, config 64 KiB, values 256 KiB."""
    return create_request(
        deployment_name=f"big-{n}",
        app_type="helm",
        docker_image=None,
        helm_repo_url="https://charts.example.com",
        helm_chart_name="podinfo",
        custom_values_yaml="a: " + "y" * 262_000,
        config={"k": "c" * 65_000},
        environment_variables=[f"V{i}={'e' * 32_000}" for i in range(8)],
        request_id=str(uuid.uuid4()),
    )


async def test_list_pages_of_maximum_size_rows_fit_a_default_client(secure_api_factory: ApiFactory) -> None:
    api = await secure_api_factory()
    alice = api.user("alice")
    created = []
    for n in range(12):
        request = _maximum_size_request(n)
        assert request.ByteSize() > 570_000
        created.append((await api.stub.CreateAppHostingDeployment(request, metadata=alice.metadata)).id)
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        # A default page: 50 rows by count, which these rows' bytes end early.
        page = await api.stub.ListDeployments(pb.ListDeploymentsRequest(page_token=token), metadata=alice.metadata)
        assert page.ByteSize() < 4 * 1024 * 1024 - 512 * 1024
        seen.extend(d.id for d in page.deployments)
        pages += 1
        if not page.next_page_token:
            break
        token = page.next_page_token
    assert seen == list(reversed(created))
    assert pages > 1
