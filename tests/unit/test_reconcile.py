"""Unit tests of the provisioner's reconciler against the simulated driver."""

from __future__ import annotations

import uuid

import pytest

from apphosting.v1 import bus_pb2, deployments_pb2
from provisioner import (
    CREATE_STEPS,
    DELETE_STEPS,
    DELETED_PHASE,
    PermanentError,
    Reconciler,
    RetryPolicy,
    SimulatedDriver,
    StepResult,
    host_namespace_name,
    vcluster_name,
)

_Status = deployments_pb2.DeploymentStatus
_DEPLOYMENT_ID = "3f2b8c1d-9e4a-4b7c-8d2e-1a2b3c4d5e6f"


class _Bus:
    """Collects published events; can die after a number of them, like a crashing worker."""

    def __init__(self, crash_after: int | None = None) -> None:
        self.events: list[bus_pb2.StatusEvent] = []
        self._crash_after = crash_after

    async def emit(self, event: bus_pb2.StatusEvent) -> None:
        if self._crash_after is not None and len(self.events) >= self._crash_after:
            raise _CrashError
        self.events.append(event)

    @property
    def phases(self) -> list[str]:
        return [event.phase for event in self.events]


class _CrashError(Exception):
    pass


class _Clock:
    """An injected sleep: records the waits instead of taking them."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []
        self.heartbeats = 0

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    async def heartbeat(self) -> None:
        self.heartbeats += 1


def _job(
    operation: bus_pb2.Operation.ValueType = bus_pb2.OPERATION_CREATE,
    *,
    job_id: str = "job-1",
    deployment_id: str = _DEPLOYMENT_ID,
    name: str = "shop",
    image: str | None = "ghcr.io/acme/shop:1",
    chart: str | None = None,
) -> bus_pb2.ProvisionJob:
    deployment = deployments_pb2.Deployment(id=deployment_id, name=name, geographic_region="eu")
    if image is not None:
        deployment.docker_image = image
    if chart is not None:
        deployment.helm_chart_name = chart
    location = bus_pb2.Location(id="eu-west-1a", provider="hetzner", region="fsn1", geographic_region="eu")
    return bus_pb2.ProvisionJob(job_id=job_id, operation=operation, deployment=deployment, location=location)


def _reconciler(driver: SimulatedDriver, bus: _Bus, clock: _Clock, policy: RetryPolicy | None = None) -> Reconciler:
    return Reconciler(driver, bus.emit, worker_id="w1", policy=policy, sleep=clock.sleep, heartbeat=clock.heartbeat)


async def test_create_emits_ordered_phases_and_ends_running() -> None:
    driver, bus, clock = SimulatedDriver(), _Bus(), _Clock()

    last = await _reconciler(driver, bus, clock).run(_job())

    assert bus.phases == list(CREATE_STEPS)
    provisioning = [_Status.DEPLOYMENT_STATUS_PROVISIONING] * (len(CREATE_STEPS) - 1)
    assert [event.status for event in bus.events[:-1]] == provisioning
    assert last == bus.events[-1]
    assert last.status == _Status.DEPLOYMENT_STATUS_RUNNING
    assert last.endpoint_url == "https://shop-3f2b8c1d.eu-west-1a.apps.example.test"
    assert (last.provider, last.region, last.location_id) == ("hetzner", "fsn1", "eu-west-1a")
    assert last.cluster_status == "ready"
    assert [(c.type, c.status) for c in last.conditions] == [("Ready", "True")]
    assert all(event.deployment_id == _DEPLOYMENT_ID for event in bus.events)
    assert len({event.event_id for event in bus.events}) == len(bus.events)
    assert not last.HasField("error_message")
    assert clock.sleeps == []


async def test_rerun_creates_nothing_twice_and_repeats_event_ids() -> None:
    driver, clock = SimulatedDriver(), _Clock()
    first = _Bus()
    await _reconciler(driver, first, clock).run(_job())

    again = _Bus()
    await _reconciler(driver, again, clock).run(_job())

    assert [event.event_id for event in again.events] == [event.event_id for event in first.events]
    assert len(driver.created_counts) == 3
    assert set(driver.created_counts.values()) == {1}
    assert "already exists" in again.events[0].message


async def test_job_resumes_after_a_crash_without_repeating_work() -> None:
    driver, clock = SimulatedDriver(), _Clock()
    crashed = _Bus(crash_after=4)
    with pytest.raises(_CrashError):
        await _reconciler(driver, crashed, clock).run(_job())
    # The worker died after deploying the app but before it could report it.
    assert len(crashed.events) == 4
    assert len(driver.apps) == 1

    resumed = _Bus()
    last = await _reconciler(driver, resumed, clock).run(_job())

    assert last.status == _Status.DEPLOYMENT_STATUS_RUNNING
    assert [e.event_id for e in resumed.events[:4]] == [e.event_id for e in crashed.events]
    assert set(driver.created_counts.values()) == {1}
    assert len(driver.created_counts) == 3


async def test_permanent_failure_fails_at_once() -> None:
    driver, bus, clock = SimulatedDriver(), _Bus(), _Clock()

    last = await _reconciler(driver, bus, clock).run(_job(image="ghcr.io/acme/fail-permanent:1"))

    assert bus.phases == ["host_namespace", "vcluster", "vcluster_ready", "app"]
    assert last.status == _Status.DEPLOYMENT_STATUS_FAILED
    assert "ghcr.io/acme/fail-permanent:1 could not be pulled (ErrImagePull)" in last.error_message
    # The quiet kubeconfig step's condition rides on the next event, here the failure.
    assert [(c.type, c.status, c.reason) for c in last.conditions] == [
        ("KubeconfigAvailable", "True", "Done"),
        ("AppDeployed", "False", "PermanentFailure"),
    ]
    assert clock.sleeps == []
    assert driver.apps == {}


async def test_every_step_is_observed_once_with_its_outcome_whatever_the_events() -> None:
    observed: list[tuple[str, str]] = []

    def observe(step: str, outcome: str, seconds: float) -> None:
        assert seconds >= 0
        observed.append((step, outcome))

    def reconciler(driver: SimulatedDriver, bus: _Bus, policy: RetryPolicy | None = None) -> Reconciler:
        # A window longer than the run: done steps share events, yet each is observed on its own.
        return Reconciler(driver, bus.emit, worker_id="w1", policy=policy, report_window=3600.0, observe=observe)

    bus = _Bus()
    await reconciler(SimulatedDriver(), bus).run(_job())
    assert len(bus.events) < len(CREATE_STEPS)
    steps = ["host_namespace", "vcluster", "vcluster_ready", "kubeconfig", "app", "rollout", "endpoint"]
    assert observed == [(step, "done") for step in steps]

    observed.clear()
    await reconciler(SimulatedDriver(), _Bus()).run(_job(image="ghcr.io/acme/fail-permanent:1"))
    assert observed == [(step, "done") for step in steps[:4]] + [("app", "failed")]

    observed.clear()
    policy = RetryPolicy(backoff_base=0.0, backoff_cap=0.0, max_attempts=2)
    await reconciler(SimulatedDriver(), _Bus(), policy).run(_job(chart="fail-temporary-chart", image=None))
    assert observed[-1] == ("app", "error")

    observed.clear()
    await reconciler(_StuckDriver(), _Bus(), RetryPolicy(step_timeout=0.0)).run(_job())
    assert observed[-1] == ("vcluster_ready", "timeout")


async def test_temporary_failure_backs_off_then_errors_naming_the_step() -> None:
    driver, bus, clock = SimulatedDriver(), _Bus(), _Clock()
    policy = RetryPolicy(backoff_base=1.0, backoff_cap=4.0, max_attempts=5)

    last = await _reconciler(driver, bus, clock, policy).run(_job(chart="fail-temporary-chart", image=None))

    assert clock.sleeps == [1.0, 2.0, 4.0, 4.0]
    assert clock.heartbeats >= len(clock.sleeps)
    assert last.status == _Status.DEPLOYMENT_STATUS_ERROR
    assert last.phase == "app"
    assert last.error_message.startswith("[simulated] step app failed after 5 attempts:")
    assert "registry timed out" in last.error_message


async def test_retry_answers_are_polled_until_done() -> None:
    driver, bus, clock = SimulatedDriver(ready_polls=2, poll_after=3.0), _Bus(), _Clock()

    last = await _reconciler(driver, bus, clock).run(_job())

    assert last.status == _Status.DEPLOYMENT_STATUS_RUNNING
    # Two "not yet" answers while the vCluster starts, two while the app rolls out.
    assert clock.sleeps == [3.0] * 4
    assert bus.phases == list(CREATE_STEPS)


class _StuckDriver(SimulatedDriver):
    async def vcluster_ready(self, job: bus_pb2.ProvisionJob) -> StepResult:
        return StepResult.retry(5.0, f"[simulated] vCluster {vcluster_name(job.deployment)} starting")


async def test_stuck_step_times_out_into_error_naming_the_step() -> None:
    driver, bus, clock = _StuckDriver(), _Bus(), _Clock()
    policy = RetryPolicy(step_timeout=12.0)

    last = await _reconciler(driver, bus, clock, policy).run(_job())

    assert clock.sleeps == [5.0, 5.0, 2.0]
    assert last.status == _Status.DEPLOYMENT_STATUS_ERROR
    assert last.phase == "vcluster_ready"
    assert "step vcluster_ready timed out after 12 s" in last.error_message
    assert last.cluster_status == "error"


class _FlakyDriver(SimulatedDriver):
    """Its namespace step raises once: a bug or a dropped connection, not the request's fault."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self._error: Exception | None = error

    async def ensure_namespace(self, job: bus_pb2.ProvisionJob) -> StepResult:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return await super().ensure_namespace(job)


async def test_unexpected_driver_errors_are_retried() -> None:
    driver, bus, clock = _FlakyDriver(ConnectionResetError("peer reset")), _Bus(), _Clock()

    last = await _reconciler(driver, bus, clock).run(_job())

    assert last.status == _Status.DEPLOYMENT_STATUS_RUNNING
    assert clock.sleeps == [1.0]
    assert set(driver.created_counts.values()) == {1}


async def test_a_raised_permanent_error_fails_the_job() -> None:
    driver, bus, clock = _FlakyDriver(PermanentError("[simulated] quota exceeded for good")), _Bus(), _Clock()

    last = await _reconciler(driver, bus, clock).run(_job())

    assert last.status == _Status.DEPLOYMENT_STATUS_FAILED
    assert last.phase == "host_namespace"
    assert last.error_message == "[simulated] quota exceeded for good"
    assert last.cluster_status == "error"
    assert clock.sleeps == []


async def test_long_waits_are_split_by_heartbeats() -> None:
    driver, bus, clock = SimulatedDriver(ready_polls=1, poll_after=25.0), _Bus(), _Clock()
    policy = RetryPolicy(heartbeat_interval=10.0)

    await _reconciler(driver, bus, clock, policy).run(_job())

    assert clock.sleeps == [10.0, 10.0, 5.0] * 2
    assert clock.heartbeats >= len(clock.sleeps)


async def test_delete_ends_with_final_event_and_empty_state() -> None:
    driver, bus, clock = SimulatedDriver(), _Bus(), _Clock()
    await _reconciler(driver, _Bus(), clock).run(_job())

    last = await _reconciler(driver, bus, clock).run(_job(bus_pb2.OPERATION_DELETE, job_id="job-2"))

    assert bus.phases == [*DELETE_STEPS, DELETED_PHASE]
    assert all(event.status == _Status.DEPLOYMENT_STATUS_DELETING for event in bus.events)
    assert [event.final for event in bus.events] == [False, False, False, True]
    assert last.final
    assert (driver.namespaces, driver.vclusters, driver.apps) == ({}, {}, {})


async def test_delete_of_what_is_already_gone_still_ends_final() -> None:
    driver, bus, clock = SimulatedDriver(), _Bus(), _Clock()

    last = await _reconciler(driver, bus, clock).run(_job(bus_pb2.OPERATION_DELETE))

    assert last.final
    assert all("already gone" in event.message for event in bus.events[:-1])


async def test_every_event_is_marked_simulated() -> None:
    driver, bus, clock = SimulatedDriver(), _Bus(), _Clock()
    reconciler = _reconciler(driver, bus, clock, RetryPolicy(max_attempts=2))

    await reconciler.run(_job())
    await reconciler.run(_job(job_id="job-2", deployment_id=str(uuid.uuid4()), image="x/fail-permanent:1"))
    await reconciler.run(_job(job_id="job-3", deployment_id=str(uuid.uuid4()), image="x/fail-temporary:1"))
    await reconciler.run(_job(bus_pb2.OPERATION_DELETE, job_id="job-4"))

    assert len(bus.events) == len(CREATE_STEPS) + 4 + 4 + len(DELETE_STEPS) + 1
    for event in bus.events:
        assert event.simulated
        assert event.message.startswith("[simulated] ")
        assert event.source == "provisioner/w1"


@pytest.mark.parametrize(("failure_rate", "status"), [(0.0, "RUNNING"), (1.0, "FAILED")])
async def test_failure_rate_decides_the_app_step(failure_rate: float, status: str) -> None:
    driver, bus, clock = SimulatedDriver(failure_rate=failure_rate, seed=7), _Bus(), _Clock()
    reconciler = _reconciler(driver, bus, clock)

    results = [
        await reconciler.run(_job(job_id=f"job-{i}", deployment_id=str(uuid.uuid4()), name=f"app{i}"))
        for i in range(20)
    ]

    assert {_Status.Name(result.status) for result in results} == {f"DEPLOYMENT_STATUS_{status}"}
    if status == "FAILED":
        assert all("(ErrImagePull)" in result.error_message for result in results)
        assert driver.apps == {}


async def test_simulated_work_takes_its_delay_through_the_injected_sleep() -> None:
    clock = _Clock()
    driver, bus = SimulatedDriver(delay=0.5, sleep=clock.sleep), _Bus()

    await _reconciler(driver, bus, clock).run(_job())

    # Every step works, the quiet kubeconfig step too.
    assert clock.sleeps == [0.5] * (len(CREATE_STEPS) + 1)


def test_names_are_deterministic_labels() -> None:
    long = _job(name="My_Very.Long-App-Name-" + "x" * 80).deployment

    assert host_namespace_name(_job().deployment) == "vc-3f2b8c1d9e4a-shop"
    assert host_namespace_name(long) == host_namespace_name(long)
    assert len(host_namespace_name(long)) <= 63
    assert len(vcluster_name(long)) <= 53
    assert host_namespace_name(long).startswith("vc-3f2b8c1d9e4a-my-very-long-app-name-")
