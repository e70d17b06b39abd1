"""The simulated driver's state file: shared by provisioner processes, it outlives a crash."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from apphosting.v1 import bus_pb2, deployments_pb2
from provisioner.reconcile import Reconciler, RetryPolicy
from provisioner.simulated import SimulatedDriver, SimulatedState

FAST = RetryPolicy(backoff_base=0.001, backoff_cap=0.01, min_poll=0.001)


def job(operation: bus_pb2.Operation.ValueType, job_id: str) -> bus_pb2.ProvisionJob:
    deployment = deployments_pb2.Deployment(
        id="7d3f1c2e-0b4a-4e8e-9a51-2f6c3d4e5f60", name="shop", geographic_region="eu", docker_image="nginx:1"
    )
    location = bus_pb2.Location(id="eu-a", provider="hetzner", region="fsn1", geographic_region="eu")
    return bus_pb2.ProvisionJob(job_id=job_id, operation=operation, deployment=deployment, location=location)


async def run(driver: SimulatedDriver, work: bus_pb2.ProvisionJob) -> bus_pb2.StatusEvent:
    events: list[bus_pb2.StatusEvent] = []

    async def emit(event: bus_pb2.StatusEvent) -> None:
        events.append(event)

    return await Reconciler(driver, emit, worker_id="w", policy=FAST).run(work)


async def test_a_restarted_or_second_worker_creates_nothing_twice(tmp_path: Path) -> None:
    state = SimulatedState(tmp_path / "cluster.db")
    create = job(bus_pb2.OPERATION_CREATE, "job-1")
    first = await run(SimulatedDriver(state=state), create)
    # A new driver over the same file is a restarted process: it finds the earlier work.
    again = await run(SimulatedDriver(state=SimulatedState(tmp_path / "cluster.db")), create)
    racing = await asyncio.gather(*(run(SimulatedDriver(state=state), create) for _ in range(5)))
    assert {e.status for e in (first, again, *racing)} == {deployments_pb2.DEPLOYMENT_STATUS_RUNNING}
    assert len(state.creations()) == 3
    assert set(state.creations().values()) == {1}
    assert len(state.live()) == 3


async def test_teardown_by_another_worker_removes_everything(tmp_path: Path) -> None:
    state = SimulatedState(tmp_path / "cluster.db")
    await run(SimulatedDriver(state=state), job(bus_pb2.OPERATION_CREATE, "job-1"))
    final = await run(SimulatedDriver(state=state), job(bus_pb2.OPERATION_DELETE, "job-2"))
    assert final.final
    assert state.live() == set()


def test_a_thread_keeps_one_connection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    connect = sqlite3.connect

    def counting(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        opened.append(threading.current_thread().name)
        made: sqlite3.Connection = connect(*args, **kwargs)
        return made

    monkeypatch.setattr(sqlite3, "connect", counting)
    state = SimulatedState(tmp_path / "cluster.db")
    for index in range(20):
        assert state.claim("app", f"a{index}", {"release": index})
        assert state.attributes("app", f"a{index}") == {"release": index}
    assert len(opened) == 1
    # Another thread has a connection of its own, and sees what the first one wrote.
    other = threading.Thread(target=lambda: state.exists("app", "a0"), name="other")
    other.start()
    other.join()
    assert opened == [opened[0], "other"]


def test_a_failed_claim_writes_nothing_and_leaves_the_file_usable(tmp_path: Path) -> None:
    state = SimulatedState(tmp_path / "cluster.db")
    with pytest.raises(TypeError):
        # Refused after its transaction began: the data cannot be written as JSON.
        state.claim("app", "broken", {"spec": object()})
    assert not state.exists("app", "broken")
    # The same connection starts a new transaction, and another connection can still write.
    assert state.claim("app", "next", {"release": 1})
    assert SimulatedState(tmp_path / "cluster.db").claim("app", "third")
    assert state.creations() == {"app/next": 1, "app/third": 1}


def test_look_says_whether_an_object_exists_and_what_it_is_like(tmp_path: Path) -> None:
    state = SimulatedState(tmp_path / "cluster.db")
    assert state.look("app", "shop") == (False, None)
    assert state.claim("namespace", "plain")
    assert state.look("namespace", "plain") == (True, None)
    assert state.claim("app", "shop", {"release": 2})
    assert state.look("app", "shop") == (True, {"release": 2})
    assert state.remove("app", "shop")
    assert state.look("app", "shop") == (False, None)
