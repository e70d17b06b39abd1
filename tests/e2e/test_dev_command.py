"""`apphosting dev`, the README's run command: everything starts, a deployment runs, Ctrl-C stops it all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from apphosting.nats_server import free_port, wait_for_port
from apphosting.v1 import deployments_pb2 as pb
from apphosting.v1 import deployments_pb2_grpc

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "create-deployment.json"


def _start_dev(tmp_path: Path, port: int, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "apphosting_cli",
            "dev",
            "--listen",
            f"127.0.0.1:{port}",
            "--data-dir",
            str(tmp_path / "data"),
            # Any free port: a fixed one would collide with a second run or another program.
            "--rest-listen",
            "127.0.0.1:0",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_dev_runs_a_deployment_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    process = _start_dev(tmp_path, port, "--simulate-delay", "0.01")
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


def _banner_line(process: subprocess.Popen[str], word: str) -> str:
    """The first line of dev's output that holds `word` (the banner follows its start-up)."""
    assert process.stdout is not None
    for line in process.stdout:
        if word in line:
            return line
    raise AssertionError(f"dev ended without printing {word!r}: {process.wait()}")


def _stop(process: subprocess.Popen[str]) -> None:
    """Ctrl-C, then SIGKILL if it has not ended within a minute; closes its pipes."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()


@pytest.mark.parametrize(("interval", "always", "nanoseconds"), [("always", True, None), ("10s", False, 10**10)])
def test_dev_runs_nats_with_the_sync_interval_asked_for(
    tmp_path: Path, interval: str, always: bool, nanoseconds: int | None
) -> None:
    process = _start_dev(tmp_path, free_port(), "--nats-sync-interval", interval)
    try:
        nats_line = _banner_line(process, "monitoring http://")
        monitor = nats_line.split("monitoring ", 1)[1].split(")", 1)[0]
        # What the running server reports, not what was written to its config file.
        with urllib.request.urlopen(f"{monitor}/varz", timeout=30) as answer:
            config = json.load(answer)["jetstream"]["config"]
    finally:
        _stop(process)
    assert bool(config.get("sync_always")) is always
    if nanoseconds is not None:
        assert config["sync_interval"] == nanoseconds


def _nats_children(pid: int) -> list[int]:
    """The nats-server processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"nats-server" in command:
            found.append(int(entry.name))
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting for whoever adopted it to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the parent-death signal is Linux's")
def test_dev_killed_with_sigkill_takes_its_nats_server_with_it(tmp_path: Path) -> None:
    port = free_port()
    process = _start_dev(tmp_path, port)
    nats_pids: list[int] = []
    try:
        # nats-server starts before the API, so it runs once the API's port answers.
        wait_for_port(port, timeout=60)
        nats_pids = _nats_children(process.pid)
        assert len(nats_pids) == 1, nats_pids
        process.kill()
        process.communicate()
        deadline = time.monotonic() + 60
        while _running(nats_pids[0]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(nats_pids[0]), "nats-server outlived the SIGKILLed `apphosting dev`"
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()
        for pid in nats_pids:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
