"""The platform as real processes, each started by the `apphosting` command, any of which a test
can SIGKILL and start again: for crash tests and the chaos run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from apphosting.nats_server import NatsServer, free_port, wait_for_port
from tests.support.nats_cluster import NatsCluster


@dataclass
class Process:
    """One `apphosting …` process with its command line, so it can be started again the same way."""

    name: str
    args: list[str]
    log: Path
    port: int | None = None
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        self.starts += 1
        with self.log.open("ab") as out:
            out.write(f"--- start {self.starts}: {' '.join(self.args)}\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "apphosting_cli", *self.args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        if self.port is not None:
            wait_for_port(self.port, timeout=60)

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL: no goodbye, no ack, no flush."""
        if self.popen is not None and self.alive:
            self.popen.kill()
            self.popen.wait()

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM and wait: the graceful path."""
        if self.popen is None:
            return None
        if self.alive:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


@dataclass
class Cluster:
    workdir: Path
    database_url: str
    locations_file: str | None = None
    simulate_delay: float = 0.05
    # More than 1: the processes talk to a JetStream cluster of that many nodes instead of `nats`.
    nats_nodes: int = 1
    nats: NatsServer = field(init=False)
    nats_cluster: NatsCluster | None = field(init=False, default=None)
    processes: dict[str, Process] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.nats = NatsServer(self.workdir / "jetstream")
        if self.nats_nodes > 1:
            self.nats_cluster = NatsCluster(self.workdir / "nats-cluster", self.nats_nodes)
        self.state_file = str(self.workdir / "simulated-clusters.db")

    def _common(self) -> list[str]:
        args = ["--nats-url", self.nats.url if self.nats_cluster is None else self.nats_cluster.url]
        if self.locations_file:
            args += ["--locations", self.locations_file]
        return args

    def _add(self, name: str, args: list[str], port: int | None = None) -> Process:
        process = Process(name, args, self.workdir / f"{name}.log", port)
        self.processes[name] = process
        process.start()
        return process

    def add_api(self, name: str) -> Process:
        port = free_port()
        args = [
            "api",
            "--listen",
            f"127.0.0.1:{port}",
            "--database-url",
            self.database_url,
            # Crashes, not tenancy, are under test here: one local user without quotas.
            "--insecure-no-auth",
            "--no-quotas",
            *self._common(),
        ]
        return self._add(name, args, port)

    def add_scheduler(self, name: str) -> Process:
        return self._add(name, ["scheduler", "--database-url", self.database_url, *self._common()])

    def add_provisioner(self, name: str, simulate_delay: float | None = None) -> Process:
        args = [
            "provisioner",
            "--simulate-delay",
            str(self.simulate_delay if simulate_delay is None else simulate_delay),
            "--simulate-state",
            self.state_file,
            *self._common(),
        ]
        return self._add(name, args)

    def api_addresses(self) -> list[str]:
        return [f"127.0.0.1:{p.port}" for p in self.processes.values() if p.port is not None]

    def close(self) -> None:
        for process in self.processes.values():
            process.stop(timeout=15)
        self.nats.stop()
        if self.nats_cluster is not None:
            self.nats_cluster.stop()
