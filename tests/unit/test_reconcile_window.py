"""The report window: steps done in quick succession cost one event, a slow step lets the held event
out while it runs, and a re-run publishes no event that a first run could have left out."""

from __future__ import annotations

import asyncio

import pytest

from apphosting import phases
from apphosting.v1 import bus_pb2, deployments_pb2
from provisioner import CREATE_STEPS, PermanentError, Reconciler, SimulatedDriver, StepResult, event_id
from tests.unit.test_reconcile_day2 import _job as day2_job

_Status = deployments_pb2.DeploymentStatus
# Long enough that steps of the simulated driver at zero delay always finish within it.
_LONG = 60.0
# Generous: the machine may be loaded; each wait below ends as soon as its event is out.
_WITHIN = 30.0


class _Bus:
    """Collects published events; can die at an event, like a crashing worker."""

    def __init__(self, crash_at: str | None = None) -> None:
        self.events: list[bus_pb2.StatusEvent] = []
        self.published = asyncio.Condition()
        self._crash_at = crash_at

    async def emit(self, event: bus_pb2.StatusEvent) -> None:
        if event.phase == self._crash_at:
            raise _CrashError
        self.events.append(event)
        async with self.published:
            self.published.notify_all()

    async def wait_for(self, phase: str) -> None:
        async with self.published:
            await self.published.wait_for(lambda: phase in self.phases)

    @property
    def phases(self) -> list[str]:
        return [event.phase for event in self.events]


class _CrashError(Exception):
    pass


def _job(operation: bus_pb2.Operation.ValueType = bus_pb2.OPERATION_CREATE, release: int = 0) -> bus_pb2.ProvisionJob:
    return day2_job(operation, release)


def _reconciler(driver: SimulatedDriver, bus: _Bus, window: float) -> Reconciler:
    return Reconciler(driver, bus.emit, worker_id="w1", report_window=window)


def _conditions(event: bus_pb2.StatusEvent) -> list[tuple[str, str]]:
    return [(c.type, c.status) for c in event.conditions]


async def test_steps_done_within_the_window_cost_one_event_carrying_all_their_conditions() -> None:
    driver, bus = SimulatedDriver(), _Bus()

    last = await _reconciler(driver, bus, _LONG).run(_job())

    # One event: the last step's, carrying every step's condition with the time that step was done.
    assert bus.phases == ["endpoint"]
    assert _conditions(last) == [
        ("HostNamespaceReady", "True"),
        ("VClusterCreated", "True"),
        ("VClusterReady", "True"),
        ("KubeconfigAvailable", "True"),
        ("AppDeployed", "True"),
        ("AppAvailable", "True"),
        ("Ready", "True"),
    ]
    assert last == bus.events[-1]
    assert (last.status, last.release_healthy) == (_Status.DEPLOYMENT_STATUS_RUNNING, True)
    assert last.endpoint_url == "https://shop-5a1c9e2b.eu-west-1a.apps.example.test"
    assert [e.event_id for e in bus.events] == [event_id(_job().job_id, p, "done") for p in bus.phases]


async def test_an_update_within_the_window_is_one_event_with_the_record_fields_of_every_step() -> None:
    driver = SimulatedDriver()
    await _reconciler(driver, _Bus(), 0).run(_job(release=1))
    bus = _Bus()

    last = await _reconciler(driver, bus, _LONG).run(_job(bus_pb2.OPERATION_UPDATE, release=2))

    assert bus.phases == ["endpoint"]
    assert _conditions(last) == [
        ("KubeconfigAvailable", "True"),
        ("AppDeployed", "True"),
        ("AppAvailable", "True"),
        ("Ready", "True"),
    ]
    assert last.release_healthy
    assert last.endpoint_url


class _SlowVClusterDriver(SimulatedDriver):
    """Its vCluster step is done only once the namespace step's event is out: a slow real cluster."""

    def __init__(self, bus: _Bus) -> None:
        super().__init__()
        self._bus = bus

    async def ensure_vcluster(self, job: bus_pb2.ProvisionJob) -> StepResult:
        await self._bus.wait_for("host_namespace")
        return await super().ensure_vcluster(job)


async def test_a_slow_step_lets_the_held_event_out_while_it_runs() -> None:
    bus = _Bus()
    driver = _SlowVClusterDriver(bus)

    async with asyncio.timeout(_WITHIN):
        last = await _reconciler(driver, bus, 0.01).run(_job())

    assert bus.phases == ["host_namespace", "endpoint"]
    assert _conditions(bus.events[0]) == [("HostNamespaceReady", "True")]
    # The steps done after the namespace's event was out ride on the last step's.
    assert _conditions(bus.events[1])[:2] == [("VClusterCreated", "True"), ("VClusterReady", "True")]
    assert last.status == _Status.DEPLOYMENT_STATUS_RUNNING


class _BrokenVClusterDriver(SimulatedDriver):
    async def ensure_vcluster(self, job: bus_pb2.ProvisionJob) -> StepResult:
        raise PermanentError("[simulated] the host cluster refuses vClusters")


async def test_a_failure_after_a_held_step_reports_both_conditions_at_once() -> None:
    driver, bus = _BrokenVClusterDriver(), _Bus()

    last = await _reconciler(driver, bus, _LONG).run(_job())

    assert bus.phases == ["vcluster"]
    assert last == bus.events[0]
    assert last.status == _Status.DEPLOYMENT_STATUS_FAILED
    assert last.error_message == "[simulated] the host cluster refuses vClusters"
    assert [(c.type, c.status, c.reason) for c in last.conditions] == [
        ("HostNamespaceReady", "True", "Done"),
        ("VClusterCreated", "False", "PermanentFailure"),
    ]
    assert last.cluster_status == "error"


@pytest.mark.parametrize("first_window", [0.0, _LONG])
async def test_a_rerun_publishes_only_events_every_complete_run_publishes(first_window: float) -> None:
    driver, first = SimulatedDriver(), _Bus()
    await _reconciler(driver, first, first_window).run(_job())

    again = _Bus()
    await _reconciler(driver, again, 0.01).run(_job(), rerun=True)

    # Whatever the first run reported alone or together, the re-run's one event is its last step's,
    # which the first run published under the same id: the bus and the API drop it.
    assert again.phases == ["endpoint"]
    assert {e.event_id for e in again.events} <= {e.event_id for e in first.events}
    assert set(driver.created_counts.values()) == {1}


async def test_a_rerun_after_a_crash_resumes_with_the_steps_it_has_not_reported() -> None:
    # The first run reported the namespace alone (its vCluster was slow), then died at its last event.
    crashed = _Bus(crash_at="endpoint")
    driver = _SlowVClusterDriver(crashed)
    with pytest.raises(_CrashError):
        async with asyncio.timeout(_WITHIN):
            await _reconciler(driver, crashed, 0.01).run(_job())
    assert crashed.phases == ["host_namespace"]

    resumed = _Bus()
    last = await _reconciler(SimulatedDriver(), resumed, 0.01).run(_job(), rerun=True)

    assert resumed.phases == ["endpoint"]
    assert ("VClusterReady", "True") in _conditions(last)
    assert last.status == _Status.DEPLOYMENT_STATUS_RUNNING


async def test_a_window_of_zero_reports_every_step() -> None:
    bus = _Bus()

    await _reconciler(SimulatedDriver(), bus, 0).run(_job(), rerun=True)

    assert bus.phases == list(CREATE_STEPS)


def test_a_negative_window_is_refused() -> None:
    with pytest.raises(ValueError, match="report_window"):
        Reconciler(SimulatedDriver(), _Bus().emit, worker_id="w1", report_window=-1)


def test_the_create_plan_reports_the_steps_the_api_counts_from_vcluster_readiness() -> None:
    # The API's placed-to-ready metric reads these phases; a step added to the plan must be added there.
    assert CREATE_STEPS[CREATE_STEPS.index(phases.VCLUSTER_READY) :] == phases.CREATE_FROM_VCLUSTER_READY
