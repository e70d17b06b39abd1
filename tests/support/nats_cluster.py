"""A JetStream cluster of real nats-server processes on loopback, whose nodes a test can kill, freeze and restart."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

from apphosting.nats_server import ClusterRoutes, NatsServer, free_ports

CLUSTER_NAME = "apphosting-test"


class NatsCluster:
    """`size` nodes with routes to each other, each with its own store and monitoring port.

    `url` is the comma-separated list every process of the platform takes as --nats-url, so the
    cluster stands wherever one NatsServer does.
    """

    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.workdir = workdir
        self.size = size
        self.nodes = self._nodes()
        self.frozen: set[str] = set()
        # Once started, its nodes keep their ports and stores (a test's clients know them).
        self._started = False

    def _nodes(self) -> list[NatsServer]:
        """The nodes on fresh ports: client, route and monitoring ports, all different."""
        ports = free_ports(3 * self.size)
        route_ports = ports[: self.size]
        nodes = []
        for n, port in enumerate(route_ports):
            routes = ClusterRoutes(
                server_name=f"n{n + 1}",
                cluster_name=CLUSTER_NAME,
                port=port,
                peers=tuple(p for p in route_ports if p != port),
            )
            client, monitor = ports[self.size + 2 * n : self.size + 2 * n + 2]
            nodes.append(NatsServer(self.workdir / f"n{n + 1}", port=client, monitor_port=monitor, cluster=routes))
        return nodes

    @property
    def url(self) -> str:
        return ",".join(node.url for node in self.nodes)

    def node(self, name: str) -> NatsServer:
        for node in self.nodes:
            if node.cluster is not None and node.cluster.server_name == name:
                return node
        raise KeyError(name)

    def name_of(self, node: NatsServer) -> str:
        assert node.cluster is not None
        return node.cluster.server_name

    def alive(self) -> list[NatsServer]:
        """The nodes that run and answer (not frozen)."""
        return [
            n
            for n in self.nodes
            if n.process is not None and n.process.poll() is None and self.name_of(n) not in self.frozen
        ]

    def start(self, timeout: float = 60, attempts: int = 3) -> None:
        """Starts every node and waits until each has its routes to all the others and they agree on a
        meta leader.

        A port is chosen free but taken only when its node starts: another process (a parallel test's
        server) may bind it in between, and then a node cannot listen where the others look for it, so the
        cluster never places a replicated stream. Such an attempt is stopped and the cluster started again
        on fresh ports with empty stores (a first start only).
        """
        if self._started:
            attempts = 1
        self._started = True
        for attempt in range(1, attempts + 1):
            try:
                for node in self.nodes:
                    node.start()
                self._wait_formed(timeout)
                return
            except TimeoutError:
                if attempt == attempts:
                    raise
            self.stop()
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.nodes = self._nodes()

    def _wait_formed(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        names = {self.name_of(node) for node in self.nodes}
        while time.monotonic() < deadline:
            if all(node.process is not None and node.process.poll() is None for node in self.nodes) and all(
                self.peers(node) == names - {self.name_of(node)} for node in self.nodes
            ):
                break
            time.sleep(0.1)
        else:
            raise TimeoutError(f"the {self.size} nodes did not all route to each other within {timeout} s")
        self.wait_for_meta_leader(max(1.0, deadline - time.monotonic()))
        # A meta leader is not yet a JetStream API that answers: each node's health says its meta group
        # is current, and a stream can be declared through it.
        self.wait_until_healthy(max(1.0, deadline - time.monotonic()))

    def peers(self, node: NatsServer) -> set[str]:
        """The nodes this one has routes to (its /routez; a server keeps several routes to each peer)."""
        assert node.monitor_url is not None
        try:
            with urllib.request.urlopen(f"{node.monitor_url}/routez", timeout=5) as answer:
                return {str(route.get("remote_name")) for route in json.load(answer).get("routes") or ()}
        except (OSError, ValueError):
            return set()

    def stop(self) -> None:
        for node in self.nodes:
            self.resume(node)
            node.stop()

    def kill(self, node: NatsServer) -> None:
        """SIGKILL: the node's store stays as the crash left it."""
        if node.process is not None and node.process.poll() is None:
            node.process.kill()
            node.process.wait()

    def restart(self, node: NatsServer) -> None:
        """Starts a killed node again on the same ports and store."""
        node.start()

    def freeze(self, node: NatsServer) -> None:
        """SIGSTOP: its connections stay open but nothing answers, as when the network cuts it off."""
        if node.process is not None and node.process.poll() is None:
            os.kill(node.process.pid, signal.SIGSTOP)
            self.frozen.add(self.name_of(node))

    def resume(self, node: NatsServer) -> None:
        if node.process is not None and node.process.poll() is None:
            os.kill(node.process.pid, signal.SIGCONT)
        self.frozen.discard(self.name_of(node))

    def jsz(self, node: NatsServer, query: str = "") -> dict[str, Any]:
        assert node.monitor_url is not None
        with urllib.request.urlopen(f"{node.monitor_url}/jsz{query}", timeout=5) as answer:
            found: dict[str, Any] = json.load(answer)
            return found

    def meta_leader(self) -> str | None:
        """The name of the node that leads the meta group, when the live nodes agree on one."""
        leaders = set()
        for node in self.alive():
            try:
                leaders.add(self.jsz(node).get("meta_cluster", {}).get("leader"))
            except OSError:
                return None
        if len(leaders) == 1:
            leader = leaders.pop()
            return leader or None
        return None

    def stream_leader(self, stream: str) -> str | None:
        """The name of the node that leads the stream's group, as a live node reports it."""
        for node in self.alive():
            try:
                answer = self.jsz(node, "?streams=true")
            except OSError:
                continue
            for account in answer.get("account_details", []):
                for detail in account.get("stream_detail", []):
                    if detail.get("name") == stream:
                        leader = detail.get("cluster", {}).get("leader")
                        if leader:
                            return str(leader)
        return None

    def stream_replicas(self, stream: str) -> int | None:
        for node in self.alive():
            try:
                answer = self.jsz(node, "?streams=true&config=true")
            except OSError:
                continue
            for account in answer.get("account_details", []):
                for detail in account.get("stream_detail", []):
                    if detail.get("name") == stream:
                        return int(detail.get("config", {}).get("num_replicas", 1))
        return None

    def healthy(self, node: NatsServer) -> bool:
        """The node's /healthz: it runs, has a meta leader and its streams and consumers are current."""
        assert node.monitor_url is not None
        try:
            with urllib.request.urlopen(f"{node.monitor_url}/healthz", timeout=5) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    def wait_until_healthy(self, timeout: float = 180) -> None:
        """Waits until every live node is healthy: a node that came back has caught up with its
        streams, so losing another one leaves each stream a quorum (as a rolling restart waits)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.healthy(node) for node in self.alive()):
                return
            time.sleep(0.2)
        unhealthy = [self.name_of(n) for n in self.alive() if not self.healthy(n)]
        raise TimeoutError(f"nodes {unhealthy} not healthy after {timeout} s")

    def wait_for_meta_leader(self, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leader = self.meta_leader()
            if leader is not None and leader in {self.name_of(n) for n in self.alive()}:
                return leader
            time.sleep(0.1)
        raise TimeoutError(f"no meta leader among {[self.name_of(n) for n in self.alive()]} after {timeout} s")
