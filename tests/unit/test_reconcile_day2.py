"""Unit tests of the day-2 jobs (update, stop, start, adopt, adopted delete) against the simulated driver."""

from __future__ import annotations

from pathlib import Path

from apphosting.v1 import bus_pb2, deployments_pb2
from provisioner import (
    ADOPT_STEPS,
    CREATE_STEPS,
    DELETE_ADOPTED_FORCE_STEPS,
    DELETE_ADOPTED_STEPS,
    DELETED_PHASE,
    START_STEPS,
    STOP_STEPS,
    STOPPED_PHASE,
    UPDATE_STEPS,
    Reconciler,
    RetryPolicy,
    SimulatedDriver,
    event_id,
)
from provisioner.simulated import SimulatedState

_Status = deployments_pb2.DeploymentStatus
_RUNNING = _Status.DEPLOYMENT_STATUS_RUNNING
_DEPLOYMENT_ID = "5a1c9e2b-7d3f-4e8a-9b6c-0d1e2f3a4b5c"
_APP = "vc-5a1c9e2b7d3f-shop/shop"
_VCLUSTER = "vc-5a1c9e2b7d3f-shop"


class _Bus:
    def __init__(self) -> None:
        self.events: list[bus_pb2.StatusEvent] = []

    async def emit(self, event: bus_pb2.StatusEvent) -> None:
        self.events.append(event)

    @property
    def phases(self) -> list[str]:
        return [event.phase for event in self.events]


class _Clock:
    def __init__(self) -> None:
        self.sleeps: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)


def _job(
    operation: bus_pb2.Operation.ValueType,
    release: int,
    *,
    image: str = "ghcr.io/acme/shop:1",
    replicas: int | None = None,
    rollout_timeout: float = 0.0,
    adopted_from: str | None = None,
    force: bool = False,
) -> bus_pb2.ProvisionJob:
    deployment = deployments_pb2.Deployment(
        id=_DEPLOYMENT_ID, name="shop", geographic_region="eu", docker_image=image, release=release
    )
    if replicas is not None:
        deployment.replicas = replicas
    if adopted_from is not None:
        deployment.is_adopted = True
        deployment.source_namespace = adopted_from
    location = bus_pb2.Location(id="eu-west-1a", provider="hetzner", region="fsn1", geographic_region="eu")
    return bus_pb2.ProvisionJob(
        job_id=f"job-{bus_pb2.Operation.Name(operation)}-{release}",
        operation=operation,
        deployment=deployment,
        location=location,
        release=release,
        rollout_timeout_seconds=rollout_timeout,
        force=force,
    )


async def _run(
    driver: SimulatedDriver, job: bus_pb2.ProvisionJob, policy: RetryPolicy | None = None
) -> tuple[_Bus, _Clock]:
    bus, clock = _Bus(), _Clock()
    await Reconciler(driver, bus.emit, worker_id="w1", policy=policy, sleep=clock.sleep).run(job)
    return bus, clock


async def _created(driver: SimulatedDriver) -> None:
    bus, _ = await _run(driver, _job(bus_pb2.OPERATION_CREATE, 1))
    assert bus.events[-1].status == _RUNNING


async def test_create_events_carry_the_release_and_the_last_is_healthy() -> None:
    driver = SimulatedDriver()

    bus, _ = await _run(driver, _job(bus_pb2.OPERATION_CREATE, 1))

    assert bus.phases == list(CREATE_STEPS)
    assert {event.release for event in bus.events} == {1}
    assert [event.release_healthy for event in bus.events] == [False] * (len(CREATE_STEPS) - 1) + [True]
    assert not any(event.release_failed for event in bus.events)


async def test_update_changes_the_app_in_place_and_ends_healthy() -> None:
    driver = SimulatedDriver()
    await _created(driver)

    bus, _ = await _run(driver, _job(bus_pb2.OPERATION_UPDATE, 2, image="ghcr.io/acme/shop:2", replicas=3))

    assert bus.phases == list(UPDATE_STEPS)
    assert all(event.status == _RUNNING for event in bus.events)
    assert {event.release for event in bus.events} == {2}
    assert [event.release_healthy for event in bus.events] == [False, True]
    last = bus.events[-1]
    assert (last.location_id, last.cluster_status) == ("eu-west-1a", "ready")
    assert last.endpoint_url.startswith("https://shop-5a1c9e2b.")
    assert "release 1 -> 2" in bus.events[0].message
    assert "replicas 1 -> 3" in bus.events[0].message
    app = driver.apps[_APP]
    assert (app.spec.release, app.spec.source, app.spec.replicas) == (2, "image ghcr.io/acme/shop:2", 3)
    # An update is no creation.
    assert driver.created_counts[f"app/{_APP}"] == 1


async def test_a_redelivered_job_of_a_replaced_release_changes_nothing_and_reports_nothing() -> None:
    # Release 2 never got healthy; the service rolled back as release 3, which now runs. The release 2 job
    # comes again (its worker died before acking it): it must not deploy release 2 over release 3.
    driver = SimulatedDriver()
    await _created(driver)
    await _run(driver, _job(bus_pb2.OPERATION_UPDATE, 3, image="ghcr.io/acme/shop:1"))

    stale, _ = await _run(driver, _job(bus_pb2.OPERATION_UPDATE, 2, image="ghcr.io/acme/never-healthy:2"))

    assert stale.events == []
    app = driver.apps[_APP]
    assert (app.spec.release, app.spec.source) == (3, "image ghcr.io/acme/shop:1")


async def test_a_job_waiting_on_its_rollout_stops_when_a_newer_release_is_deployed() -> None:
    driver = SimulatedDriver()
    await _created(driver)
    driver.ready_polls = 5
    newer = _job(bus_pb2.OPERATION_UPDATE, 3, image="ghcr.io/acme/shop:3")

    async def sleep(_: float) -> None:
        # While release 2 rolls out, another worker deploys release 3.
        if driver.apps[_APP].spec.release == 2:
            await driver.ensure_app(newer, "")

    bus = _Bus()
    await Reconciler(driver, bus.emit, worker_id="w1", sleep=sleep).run(
        _job(bus_pb2.OPERATION_UPDATE, 2, image="ghcr.io/acme/shop:2")
    )

    assert bus.phases == ["app"]
    assert driver.apps[_APP].spec.release == 3


async def test_update_rerun_changes_nothing_and_repeats_its_event_ids() -> None:
    driver = SimulatedDriver()
    await _created(driver)
    update = _job(bus_pb2.OPERATION_UPDATE, 2, image="ghcr.io/acme/shop:2")

    first, _ = await _run(driver, update)
    again, _ = await _run(driver, update)

    assert [e.event_id for e in again.events] == [e.event_id for e in first.events]
    assert [e.event_id for e in first.events] == [event_id(update.job_id, step, "done") for step in UPDATE_STEPS]
    assert "already deployed as release 2" in again.events[0].message


async def test_update_to_a_never_healthy_image_times_out_into_release_failed() -> None:
    driver = SimulatedDriver(poll_after=2.0)
    await _created(driver)
    update = _job(bus_pb2.OPERATION_UPDATE, 2, image="ghcr.io/acme/never-healthy:2", rollout_timeout=7.0)

    bus, clock = await _run(driver, update)

    assert bus.phases == ["app", "rollout"]
    failed = bus.events[-1]
    assert failed.status == _RUNNING
    assert failed.release_failed
    assert not failed.release_healthy
    assert failed.release == 2
    assert failed.phase == "rollout"
    assert "step rollout timed out after 7 s" in failed.error_message
    assert "0/1 available" in failed.error_message
    assert [(c.type, c.status, c.reason) for c in failed.conditions] == [("AppAvailable", "False", "Timeout")]
    # The rollout timeout, not the policy's step timeout, bounds the waits.
    assert sum(clock.sleeps) == 7.0
    assert failed.event_id == event_id(update.job_id, "rollout", "timeout")


async def test_update_without_a_rollout_timeout_uses_the_policy_step_timeout() -> None:
    driver = SimulatedDriver(poll_after=2.0)
    await _created(driver)

    bus, clock = await _run(
        driver, _job(bus_pb2.OPERATION_UPDATE, 2, image="x/never-healthy:2"), RetryPolicy(step_timeout=5.0)
    )

    assert bus.events[-1].release_failed
    assert sum(clock.sleeps) == 5.0


async def test_update_to_a_bad_image_fails_once_with_the_old_release_serving() -> None:
    driver = SimulatedDriver()
    await _created(driver)

    bus, _ = await _run(driver, _job(bus_pb2.OPERATION_UPDATE, 2, image="x/fail-permanent:2"))

    assert bus.phases == ["app"]
    failed = bus.events[-1]
    assert (failed.status, failed.release_failed, failed.phase) == (_RUNNING, True, "app")
    assert "(ErrImagePull)" in failed.error_message
    assert driver.apps[_APP].spec.release == 1


async def test_update_retries_exhausted_is_a_release_failure() -> None:
    driver = SimulatedDriver()
    await _created(driver)

    bus, _ = await _run(
        driver, _job(bus_pb2.OPERATION_UPDATE, 2, image="x/fail-temporary:2"), RetryPolicy(max_attempts=2)
    )

    failed = bus.events[-1]
    assert (failed.status, failed.release_failed, failed.phase) == (_RUNNING, True, "app")
    assert failed.error_message.startswith("[simulated] step app failed after 2 attempts:")


async def test_a_rollback_after_a_failed_update_is_an_update_that_gets_healthy() -> None:
    driver = SimulatedDriver()
    await _created(driver)
    await _run(driver, _job(bus_pb2.OPERATION_UPDATE, 2, image="x/never-healthy:2", rollout_timeout=3.0))

    bus, _ = await _run(driver, _job(bus_pb2.OPERATION_UPDATE, 3, image="ghcr.io/acme/shop:1"))

    assert bus.events[-1].release_healthy
    assert driver.apps[_APP].spec.source == "image ghcr.io/acme/shop:1"
    assert driver.created_counts[f"app/{_APP}"] == 1


async def test_stop_scales_to_zero_sleeps_the_vcluster_and_ends_stopped() -> None:
    driver = SimulatedDriver()
    await _created(driver)

    bus, _ = await _run(driver, _job(bus_pb2.OPERATION_STOP, 1))

    assert bus.phases == [*STOP_STEPS, STOPPED_PHASE]
    assert [event.status for event in bus.events] == [_RUNNING] * 2 + [_Status.DEPLOYMENT_STATUS_STOPPED]
    assert {event.release for event in bus.events} == {1}
    assert not any(event.release_healthy or event.release_failed for event in bus.events)
    assert driver.apps[_APP].spec.replicas == 0
    assert driver.vclusters[_VCLUSTER].asleep


async def test_an_asleep_vcluster_fails_app_steps_temporarily() -> None:
    driver = SimulatedDriver()
    await _created(driver)
    await _run(driver, _job(bus_pb2.OPERATION_STOP, 1))

    bus, _ = await _run(driver, _job(bus_pb2.OPERATION_UPDATE, 2), RetryPolicy(max_attempts=2))

    failed = bus.events[-1]
    assert (failed.phase, failed.release_failed) == ("app", True)
    assert "vCluster vc-5a1c9e2b7d3f-shop asleep" in failed.error_message


async def test_stop_rerun_finds_it_stopped_and_start_brings_it_back() -> None:
    driver = SimulatedDriver(ready_polls=1, poll_after=1.0)
    await _created(driver)
    await _run(driver, _job(bus_pb2.OPERATION_STOP, 1))
    again, _ = await _run(driver, _job(bus_pb2.OPERATION_STOP, 1))
    assert "already stopped" in again.events[0].message
    assert "already asleep" in again.events[1].message

    bus, clock = await _run(driver, _job(bus_pb2.OPERATION_START, 1))

    assert bus.phases == list(START_STEPS)
    provisioning = [_Status.DEPLOYMENT_STATUS_PROVISIONING] * (len(START_STEPS) - 1)
    assert [event.status for event in bus.events] == [*provisioning, _RUNNING]
    assert [event.release_healthy for event in bus.events] == [False] * (len(START_STEPS) - 1) + [True]
    # The woken vCluster starts again, and the app rolls out again.
    assert clock.sleeps == [1.0, 1.0]
    assert not driver.vclusters[_VCLUSTER].asleep
    assert driver.apps[_APP].spec.replicas == 1
    assert set(driver.created_counts.values()) == {1}


async def test_start_of_a_deleted_vcluster_errors_naming_the_cluster() -> None:
    driver = SimulatedDriver()

    bus, _ = await _run(driver, _job(bus_pb2.OPERATION_START, 1), RetryPolicy(max_attempts=2))

    failed = bus.events[-1]
    assert (failed.status, failed.phase, failed.cluster_status) == (
        _Status.DEPLOYMENT_STATUS_ERROR,
        "vcluster_wake",
        "error",
    )
    assert not failed.release_failed


async def test_adopt_of_a_present_namespace_ends_running_and_healthy() -> None:
    driver = SimulatedDriver(existing_namespaces=("legacy-shop",))

    bus, _ = await _run(driver, _job(bus_pb2.OPERATION_ADOPT, 1, adopted_from="legacy-shop"))

    assert bus.phases == list(ADOPT_STEPS)
    last = bus.events[-1]
    assert (last.status, last.release, last.release_healthy) == (_RUNNING, 1, True)
    assert (last.provider, last.region, last.location_id, last.cluster_status) == (
        "hetzner",
        "fsn1",
        "eu-west-1a",
        "ready",
    )
    assert driver.namespaces == {"legacy-shop": _DEPLOYMENT_ID}
    assert driver.created_counts == {}


async def test_adopt_of_an_absent_namespace_fails_naming_it_and_the_location() -> None:
    driver = SimulatedDriver(existing_namespaces=("legacy-shop",))

    bus, clock = await _run(driver, _job(bus_pb2.OPERATION_ADOPT, 1, adopted_from="nowhere"))

    failed = bus.events[-1]
    assert (failed.status, failed.phase) == (_Status.DEPLOYMENT_STATUS_FAILED, "adopt")
    assert "namespace nowhere does not exist on location eu-west-1a" in failed.error_message
    assert clock.sleeps == []


async def test_adopted_delete_without_force_gives_the_namespace_back() -> None:
    driver = SimulatedDriver(existing_namespaces=("legacy-shop",))
    await _run(driver, _job(bus_pb2.OPERATION_ADOPT, 1, adopted_from="legacy-shop"))

    bus, _ = await _run(driver, _job(bus_pb2.OPERATION_DELETE, 1, adopted_from="legacy-shop"))

    assert bus.phases == [*DELETE_ADOPTED_STEPS, DELETED_PHASE]
    assert bus.events[-1].final
    assert driver.namespaces == {"legacy-shop": ""}
    # Given back, it can be adopted again.
    again, _ = await _run(driver, _job(bus_pb2.OPERATION_ADOPT, 2, adopted_from="legacy-shop"))
    assert again.events[-1].release_healthy


async def test_adopted_delete_with_force_deletes_the_namespace() -> None:
    driver = SimulatedDriver(existing_namespaces=("legacy-shop",))
    await _run(driver, _job(bus_pb2.OPERATION_ADOPT, 1, adopted_from="legacy-shop"))

    bus, _ = await _run(driver, _job(bus_pb2.OPERATION_DELETE, 1, adopted_from="legacy-shop", force=True))

    assert bus.phases == [*DELETE_ADOPTED_FORCE_STEPS, DELETED_PHASE]
    assert bus.events[-1].final
    assert driver.namespaces == {}
    gone, _ = await _run(driver, _job(bus_pb2.OPERATION_ADOPT, 2, adopted_from="legacy-shop"))
    assert gone.events[-1].status == _Status.DEPLOYMENT_STATUS_FAILED


async def test_workers_sharing_a_state_file_agree_on_releases_sleep_and_namespaces(tmp_path: Path) -> None:
    path = tmp_path / "cluster.db"

    def worker() -> SimulatedDriver:
        # A new driver over the file is another worker, or this one restarted.
        return SimulatedDriver(state=SimulatedState(path), existing_namespaces=("legacy-shop",))

    await _created(worker())
    await _run(worker(), _job(bus_pb2.OPERATION_UPDATE, 2, image="ghcr.io/acme/shop:2"))
    again, _ = await _run(worker(), _job(bus_pb2.OPERATION_UPDATE, 2, image="ghcr.io/acme/shop:2"))
    assert "already deployed as release 2" in again.events[0].message

    await _run(worker(), _job(bus_pb2.OPERATION_STOP, 2))
    asleep, _ = await _run(worker(), _job(bus_pb2.OPERATION_UPDATE, 3), RetryPolicy(max_attempts=1))
    assert "asleep" in asleep.events[-1].error_message
    started, _ = await _run(worker(), _job(bus_pb2.OPERATION_START, 2))
    assert started.events[-1].release_healthy

    other = _job(bus_pb2.OPERATION_ADOPT, 1, adopted_from="legacy-shop")
    other.deployment.id = other.job_id = "9e8d7c6b-5a4f-4e3d-8c2b-1a0f9e8d7c6b"
    await _run(worker(), other)
    delete = _job(bus_pb2.OPERATION_DELETE, 1, adopted_from="legacy-shop", force=True)
    delete.deployment.id = other.deployment.id
    await _run(worker(), delete)
    gone, _ = await _run(worker(), other)
    assert "does not exist" in gone.events[-1].error_message

    creations = SimulatedState(path).creations()
    assert set(creations.values()) == {1}
    assert len(creations) == 3
