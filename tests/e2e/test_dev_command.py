"""`apphosting dev`, the README's run command: everything starts, a deployment runs, Ctrl-C stops it all."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from apphosting.nats_server import free_port, wait_for_port
from apphosting.v1 import deployments_pb2 as pb
from apphosting.v1 import deployments_pb2_grpc

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "create-deployment.json"


def test_dev_runs_a_deployment_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "apphosting.cli",
            "dev",
            "--listen",
            f"127.0.0.1:{port}",
            "--data-dir",
            str(tmp_path / "data"),
            "--simulate-delay",
            "0.01",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_port(port, timeout=60)
        # Without auth flags, dev makes a key and a token for the local user (also printed).
        token = (tmp_path / "data" / "dev-token").read_text().strip()
        auth = (("authorization", f"Bearer {token}"),)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub: Any = deployments_pb2_grpc.DeploymentServiceStub(channel)
            body = json_format.Parse(EXAMPLE.read_text(), pb.CreateAppHostingDeploymentRequest())
            with pytest.raises(grpc.RpcError) as refused:
                stub.CreateAppHostingDeployment(body, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            created = stub.CreateAppHostingDeployment(body, timeout=10, metadata=auth)
            deadline = time.monotonic() + 60
            last = created
            for item in stub.WatchDeployment(pb.WatchDeploymentRequest(id=created.id), timeout=60, metadata=auth):
                last = item.deployment
                if last.status == pb.DEPLOYMENT_STATUS_RUNNING or time.monotonic() > deadline:
                    break
        assert last.status == pb.DEPLOYMENT_STATUS_RUNNING
        assert last.endpoint_url
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert f"grpc://127.0.0.1:{port}" in out
    assert "nats://127.0.0.1:" in out
    assert "apphosting dev stopped" in out
    assert f"export TOKEN={token}" in out
    assert 'grpcurl -plaintext -H "authorization: Bearer $TOKEN"' in out
    assert (tmp_path / "data" / "apphosting.db").exists()
