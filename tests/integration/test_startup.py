"""What `apphosting` says when it cannot or must not start: a taken port, no auth beyond loopback, no database."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apphosting.nats_server import NatsServer, free_port, wait_for_port
from tests.support.databases import POSTGRES_ADMIN_URL, postgres_unreachable_reason


def apphosting(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "apphosting_cli", *args, "--log-level", "WARNING"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_one_line(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    """The process failed with `code` and said why in exactly one line naming each of `words`."""
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert "running" not in result.stdout


@pytest.fixture
def served_port() -> Iterator[int]:
    """A port another server listens on, with SO_REUSEPORT set as every gRPC server sets it by default."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


async def test_a_port_taken_after_the_check_still_cannot_start_the_api(tmp_path: Path, served_port: int) -> None:
    """The bind itself refuses a served port (no SO_REUSEPORT), with the line the command shows."""
    from apphosting import CannotStart
    from services.deployments.app import ApiOptions, ApiServer

    server = ApiServer(
        ApiOptions(
            listen=f"127.0.0.1:{served_port}",
            database_url=f"sqlite+aiosqlite:///{tmp_path / 'api.db'}",
            nats_url=None,
            auth=None,
        )
    )
    try:
        with pytest.raises(CannotStart, match=f"cannot listen on 127.0.0.1:{served_port}"):
            await server.start()
    finally:
        await server.stop()


@pytest.mark.parametrize("command", ["api", "dev"])
def test_a_port_already_served_is_refused_in_one_line(tmp_path: Path, served_port: int, command: str) -> None:
    where = (
        ["--database-url", f"sqlite:///{tmp_path / 'api.db'}", "--nats-url", "nats://127.0.0.1:1"]
        if command == "api"
        else ["--data-dir", str(tmp_path / "data")]
    )
    result = apphosting(command, "--listen", f"127.0.0.1:{served_port}", "--insecure-no-auth", *where)
    assert_one_line(result, 1, f"127.0.0.1:{served_port}", "already serves")


@pytest.mark.parametrize("command", ["api", "dev"])
def test_no_authentication_beyond_loopback_is_refused_without_a_second_flag(tmp_path: Path, command: str) -> None:
    where = (
        ["--database-url", f"sqlite:///{tmp_path / 'api.db'}"]
        if command == "api"
        else ["--data-dir", str(tmp_path / "data")]
    )
    result = apphosting(command, "--listen", f"0.0.0.0:{free_port()}", "--insecure-no-auth", *where)
    assert_one_line(result, 2, "--insecure-no-auth", "--allow-insecure-remote", "0.0.0.0")
    # Refused before anything started.
    assert not (tmp_path / "api.db").exists()
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("command", ["api", "dev"])
def test_no_authentication_beyond_loopback_with_the_second_flag_serves_and_warns(
    tmp_path: Path, nats_server: NatsServer, command: str
) -> None:
    port = free_port()
    where = (
        ["--database-url", f"sqlite:///{tmp_path / 'api.db'}", "--nats-url", nats_server.url]
        if command == "api"
        else ["--data-dir", str(tmp_path / "data"), "--simulate-delay", "0.01", "--rest-listen", "127.0.0.1:0"]
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "apphosting_cli",
            command,
            "--listen",
            f"0.0.0.0:{port}",
            "--insecure-no-auth",
            "--allow-insecure-remote",
            "--log-level",
            "WARNING",
            *where,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_port(port, timeout=60)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health: Any = health_pb2_grpc.HealthStub(channel)  # its typing stub lists no methods
            answer = health.Check(health_pb2.HealthCheckRequest(), timeout=30, wait_for_ready=True)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert f"WARNING: NO AUTHENTICATION on 0.0.0.0:{port}" in err


@pytest.mark.parametrize("command", ["api", "scheduler", "migrate"])
def test_an_unreachable_database_is_one_line(command: str) -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    extra = ["--insecure-no-auth", "--listen", f"127.0.0.1:{free_port()}"] if command == "api" else []
    result = apphosting(command, "--database-url", url, *extra)
    assert_one_line(result, 1, "cannot reach the database", url)


@pytest.mark.postgres
@pytest.mark.parametrize("command", ["api", "scheduler", "migrate"])
def test_a_database_that_does_not_exist_is_one_line(command: str) -> None:
    reason = postgres_unreachable_reason()
    if reason is not None:
        pytest.skip(reason)
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/apphosting_no_such_database"
    extra = ["--insecure-no-auth", "--listen", f"127.0.0.1:{free_port()}"] if command == "api" else []
    result = apphosting(command, "--database-url", url, *extra)
    assert_one_line(result, 1, "cannot reach the database", "apphosting_no_such_database", "does not exist")
