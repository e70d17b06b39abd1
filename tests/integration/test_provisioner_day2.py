"""A real provisioner on a real nats-server runs update and stop jobs and reports them on the bus."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from apphosting import bus
from apphosting.nats_server import NatsServer
from apphosting.v1 import bus_pb2, deployments_pb2
from provisioner import STOP_STEPS, STOPPED_PHASE, UPDATE_STEPS
from provisioner.simulated import SimulatedState
from provisioner.worker import Provisioner, ProvisionerOptions
from tests.support.stack import FAST, publish

_Status = deployments_pb2.DeploymentStatus
_LOCATION = bus_pb2.Location(id="eu-fsn1-a", provider="hetzner", region="fsn1", geographic_region="eu")
_DEPLOYMENT_ID = "c4d5e6f7-1a2b-4c3d-8e9f-0a1b2c3d4e5f"
_APP = "vc-c4d5e6f71a2b-shop/shop"
# Generous: the machine may be loaded; a healthy run takes well under a second.
_WITHIN = 60.0


@dataclass
class _World:
    nc: Client
    events: asyncio.Queue[bus_pb2.StatusEvent]
    state: SimulatedState

    async def run(self, job: bus_pb2.ProvisionJob) -> list[bus_pb2.StatusEvent]:
        """Publishes the job and returns its events up to the one that ends it."""
        await publish(self.nc.jetstream(), bus.job_subject(job.location.id), job.SerializeToString(), job.job_id)
        seen: list[bus_pb2.StatusEvent] = []
        async with asyncio.timeout(_WITHIN):
            while True:
                event = await self.events.get()
                seen.append(event)
                if _ends_job(event):
                    return seen


def _ends_job(event: bus_pb2.StatusEvent) -> bool:
    return (
        event.release_healthy
        or event.release_failed
        or event.final
        or event.status
        in (_Status.DEPLOYMENT_STATUS_STOPPED, _Status.DEPLOYMENT_STATUS_FAILED, _Status.DEPLOYMENT_STATUS_ERROR)
    )


def _job(
    operation: bus_pb2.Operation.ValueType, release: int, image: str, rollout_timeout: float = 0.0
) -> bus_pb2.ProvisionJob:
    deployment = deployments_pb2.Deployment(
        id=_DEPLOYMENT_ID, name="shop", geographic_region="eu", docker_image=image, release=release
    )
    return bus_pb2.ProvisionJob(
        job_id=f"{_DEPLOYMENT_ID}-{bus_pb2.Operation.Name(operation)}-{release}",
        operation=operation,
        deployment=deployment,
        location=_LOCATION,
        release=release,
        rollout_timeout_seconds=rollout_timeout,
    )


@pytest.fixture
async def world(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[_World]:
    state_file = tmp_path / "clusters.db"
    provisioner = Provisioner(
        ProvisionerOptions(
            nats_url=nats_server.url,
            location_ids=(_LOCATION.id,),
            simulate_state=str(state_file),
            worker_id="day2",
            policy=FAST,
            # Each step's own event is under test here.
            report_window=0.0,
        )
    )
    task = asyncio.create_task(provisioner.run())
    nc = await nats.connect(nats_server.url)
    events: asyncio.Queue[bus_pb2.StatusEvent] = asyncio.Queue()

    async def on_event(msg: Msg) -> None:
        await events.put(bus_pb2.StatusEvent.FromString(msg.data))

    await bus.ensure_streams(nc.jetstream())
    await nc.subscribe(bus.event_subject(_DEPLOYMENT_ID), cb=on_event)
    await nc.flush()
    try:
        world = _World(nc, events, SimulatedState(state_file))
        created = await world.run(_job(bus_pb2.OPERATION_CREATE, 1, "ghcr.io/acme/shop:1"))
        assert created[-1].release_healthy, created[-1]
        yield world
    finally:
        await nc.drain()
        provisioner.stop()
        await task


async def test_an_update_job_rolls_the_new_release_out_in_place(world: _World) -> None:
    events = await world.run(_job(bus_pb2.OPERATION_UPDATE, 2, "ghcr.io/acme/shop:2"))

    assert [event.phase for event in events] == list(UPDATE_STEPS)
    assert all(event.status == _Status.DEPLOYMENT_STATUS_RUNNING for event in events)
    assert {event.release for event in events} == {2}
    assert events[-1].release_healthy
    assert events[-1].simulated
    assert world.state.attributes("app", _APP) == {"release": 2, "source": "image ghcr.io/acme/shop:2", "replicas": 1}
    assert world.state.creations()[f"app/{_APP}"] == 1


async def test_an_update_that_never_gets_healthy_reports_release_failed(world: _World) -> None:
    events = await world.run(_job(bus_pb2.OPERATION_UPDATE, 2, "ghcr.io/acme/never-healthy:2", rollout_timeout=1.5))

    failed = events[-1]
    assert (failed.phase, failed.status, failed.release) == ("rollout", _Status.DEPLOYMENT_STATUS_RUNNING, 2)
    assert failed.release_failed
    assert "step rollout timed out after 1.5 s" in failed.error_message


async def test_a_stop_job_ends_stopped_with_the_vcluster_asleep(world: _World) -> None:
    events = await world.run(_job(bus_pb2.OPERATION_STOP, 1, "ghcr.io/acme/shop:1"))

    assert [event.phase for event in events] == [*STOP_STEPS, STOPPED_PHASE]
    assert events[-1].status == _Status.DEPLOYMENT_STATUS_STOPPED
    assert [event.status for event in events[:-1]] == [_Status.DEPLOYMENT_STATUS_RUNNING] * len(STOP_STEPS)
    assert world.state.attributes("app", _APP) == {"release": 1, "source": "image ghcr.io/acme/shop:1", "replicas": 0}
    assert world.state.attributes("vcluster", _APP.split("/")[0]) == {"asleep": True}
