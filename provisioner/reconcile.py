"""The reconciler: runs a ProvisionJob through ordered driver steps and reports each as a status event."""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Literal

from google.protobuf import timestamp_pb2

from apphosting import logs, phases, tracing
from apphosting.v1 import bus_pb2, deployments_pb2
from provisioner.driver import Driver, PermanentError, StepOutcome, StepResult, TemporaryError

Emit = Callable[[bus_pb2.StatusEvent], Awaitable[None]]
Sleep = Callable[[float], Awaitable[None]]
Heartbeat = Callable[[], Awaitable[None]]
# Told of each step that ended: its name, its outcome (done, failed, error or timeout) and the seconds
# it took, polls and retries included, whether it reported an event of its own or not.
StepObserver = Callable[[str, str, float], None]

_log = logging.getLogger(__name__)

# Fixed, so that every worker derives the same event id for the same (job, step, outcome).
_EVENT_NAMESPACE = uuid.UUID("0b6f3c1e-5d0a-4c59-9a43-2f1f6de1a7b2")

_SIMULATED_MARK = "[simulated]"

_Status = deployments_pb2.DeploymentStatus


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often the reconciler keeps at a step before it gives up."""

    # Temporary failures wait backoff_base * 2**(n-1) seconds, at most backoff_cap.
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    # Temporary failures of one step before the job ends in ERROR.
    max_attempts: int = 5
    # Seconds a step may keep answering "not yet", counted in the waits it asks for.
    step_timeout: float = 600.0
    # Real seconds one driver call may take before it counts as a temporary failure.
    call_timeout: float = 120.0
    # Longest wait between two heartbeats, below the bus's ack wait.
    heartbeat_interval: float = 10.0
    # Shortest wait between two polls, so a driver answering "retry after 0" cannot spin the loop.
    min_poll: float = 0.5

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.heartbeat_interval <= 0:
            raise ValueError("heartbeat_interval must be positive")

    def backoff(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th temporary failure of a step."""
        return float(min(self.backoff_cap, self.backoff_base * 2 ** (failures - 1)))


@dataclass(frozen=True)
class _Step:
    name: str
    condition: str
    call: Callable[[Driver, bus_pb2.ProvisionJob, dict[str, str]], Awaitable[StepResult]]
    # Failing here means the vCluster itself is broken, which the record reports separately.
    cluster: bool = False
    # The app's rollout, whose "not yet" ends after the job's rollout timeout when it sets one.
    rollout: bool = False
    # Changes (or waits for) the app's release: a job whose release a newer one already replaced (a
    # redelivered job, after the rollout it belongs to ended) stops here instead of deploying it again.
    release_bound: bool = False
    # Done, it tells a watcher nothing on its own: its condition (and any record field it found) rides
    # on the next event instead of costing an event of its own. A failure is reported all the same,
    # and the last step of a plan is never quiet.
    quiet: bool = False


# Steps that several plans share, as the plans below use them.
_VCLUSTER_READY = _Step(
    phases.VCLUSTER_READY, phases.VCLUSTER_READY_CONDITION, lambda d, j, c: d.vcluster_ready(j), cluster=True
)
_KUBECONFIG = _Step("kubeconfig", "KubeconfigAvailable", lambda d, j, c: d.read_kubeconfig(j), quiet=True)
# Reading the kubeconfig right after the vCluster (re)starts: failing there means the vCluster is broken.
_CLUSTER_KUBECONFIG = replace(_KUBECONFIG, cluster=True)
_APP = _Step(phases.APP, "AppDeployed", lambda d, j, c: d.ensure_app(j, c.get("kubeconfig", "")), release_bound=True)
_ROLLOUT = _Step(
    phases.ROLLOUT,
    "AppAvailable",
    lambda d, j, c: d.app_rollout(j, c.get("kubeconfig", "")),
    rollout=True,
    release_bound=True,
)
_ENDPOINT = _Step(phases.ENDPOINT, "Ready", lambda d, j, c: d.endpoint(j, c.get("kubeconfig", "")))

_CREATE: tuple[_Step, ...] = (
    _Step("host_namespace", "HostNamespaceReady", lambda d, j, c: d.ensure_namespace(j), cluster=True),
    _Step("vcluster", "VClusterCreated", lambda d, j, c: d.ensure_vcluster(j), cluster=True),
    _VCLUSTER_READY,
    _CLUSTER_KUBECONFIG,
    _APP,
    _ROLLOUT,
    _ENDPOINT,
)
# An update reports two events: the release applied, then running healthy (its rollout's condition on it).
_UPDATE: tuple[_Step, ...] = (_KUBECONFIG, _APP, replace(_ROLLOUT, quiet=True), _ENDPOINT)
_STOP: tuple[_Step, ...] = (
    _KUBECONFIG,
    _Step("app_stop", "AppStopped", lambda d, j, c: d.stop_app(j, c.get("kubeconfig", ""))),
    _Step("vcluster_sleep", "VClusterAsleep", lambda d, j, c: d.sleep_vcluster(j)),
)
_START: tuple[_Step, ...] = (
    _Step("vcluster_wake", "VClusterAwake", lambda d, j, c: d.wake_vcluster(j), cluster=True),
    _VCLUSTER_READY,
    _CLUSTER_KUBECONFIG,
    _APP,
    _ROLLOUT,
    _ENDPOINT,
)
_ADOPT: tuple[_Step, ...] = (_Step("adopt", "NamespaceAdopted", lambda d, j, c: d.adopt_namespace(j)),)
_DELETE: tuple[_Step, ...] = (
    _Step("app", "AppDeleted", lambda d, j, c: d.delete_app(j)),
    _Step("vcluster", "VClusterDeleted", lambda d, j, c: d.delete_vcluster(j)),
    _Step("namespace", "HostNamespaceDeleted", lambda d, j, c: d.delete_namespace(j)),
)
# An adopted deployment has no vCluster: its namespace is given back, or with force deleted.
_DELETE_ADOPTED: tuple[_Step, ...] = (_Step("release", "NamespaceReleased", lambda d, j, c: d.release_namespace(j)),)
_DELETE_ADOPTED_FORCE: tuple[_Step, ...] = (
    _Step("app", "AppDeleted", lambda d, j, c: d.delete_app(j)),
    _Step("namespace", "HostNamespaceDeleted", lambda d, j, c: d.delete_namespace(j)),
)

# StepResult fields that are also fields of the deployment record; other fields (kubeconfig) stay private.
RecordField = Literal["endpoint_url", "git_path", "values_yaml"]
RECORD_FIELDS: tuple[RecordField, ...] = ("endpoint_url", "git_path", "values_yaml")


def _reported(steps: tuple[_Step, ...]) -> tuple[str, ...]:
    """The phases a run of these steps reports, one event each, in order (with a report window of 0)."""
    if steps[-1].quiet:
        raise ValueError(f"step {steps[-1].name}: the last step of a plan reports its outcome")
    return tuple(step.name for step in steps if not step.quiet)


CREATE_STEPS: tuple[str, ...] = _reported(_CREATE)
UPDATE_STEPS: tuple[str, ...] = _reported(_UPDATE)
STOP_STEPS: tuple[str, ...] = _reported(_STOP)
START_STEPS: tuple[str, ...] = _reported(_START)
ADOPT_STEPS: tuple[str, ...] = _reported(_ADOPT)
DELETE_STEPS: tuple[str, ...] = _reported(_DELETE)
DELETE_ADOPTED_STEPS: tuple[str, ...] = _reported(_DELETE_ADOPTED)
DELETE_ADOPTED_FORCE_STEPS: tuple[str, ...] = _reported(_DELETE_ADOPTED_FORCE)
# Every step of every plan, reported or quiet: the names a step's duration is counted under.
STEP_NAMES: frozenset[str] = frozenset(
    step.name
    for plan in (_CREATE, _UPDATE, _STOP, _START, _ADOPT, _DELETE, _DELETE_ADOPTED, _DELETE_ADOPTED_FORCE)
    for step in plan
)
# Phase of the final event of a teardown.
DELETED_PHASE = "deleted"
# Phase of the last event of a stop, the one with status STOPPED.
STOPPED_PHASE = "stopped"


@dataclass(frozen=True)
class _Plan:
    steps: tuple[_Step, ...]
    # The status of the events while the steps go.
    status: _Status.ValueType
    # The last step's event says the release runs healthy (RUNNING, where it runs).
    healthy: bool = False
    # A failure leaves the old release serving: status RUNNING and release_failed.
    release_failure: bool = False


_PLANS: dict[bus_pb2.Operation.ValueType, _Plan] = {
    bus_pb2.OPERATION_CREATE: _Plan(_CREATE, _Status.DEPLOYMENT_STATUS_PROVISIONING, healthy=True),
    bus_pb2.OPERATION_UPDATE: _Plan(_UPDATE, _Status.DEPLOYMENT_STATUS_RUNNING, healthy=True, release_failure=True),
    bus_pb2.OPERATION_STOP: _Plan(_STOP, _Status.DEPLOYMENT_STATUS_RUNNING),
    bus_pb2.OPERATION_START: _Plan(_START, _Status.DEPLOYMENT_STATUS_PROVISIONING, healthy=True),
    bus_pb2.OPERATION_ADOPT: _Plan(_ADOPT, _Status.DEPLOYMENT_STATUS_PROVISIONING, healthy=True),
}


async def _no_heartbeat() -> None:
    return None


def _carrying(event: bus_pb2.StatusEvent, carried: bus_pb2.StatusEvent) -> bus_pb2.StatusEvent:
    """`event` with the conditions of the quiet steps before it first, and the record fields they found."""
    if carried.conditions:
        conditions = [*carried.conditions, *event.conditions]
        del event.conditions[:]
        event.conditions.extend(conditions)
    for name in RECORD_FIELDS:
        if carried.HasField(name) and not event.HasField(name):
            setattr(event, name, getattr(carried, name))
    return event


class _Held:
    """A done step's event, held back for a window: the next step's event carries it when that step
    is done within the window; when the window ends first, it is published then."""

    def __init__(self, emit: Emit, event: bus_pb2.StatusEvent, window: float) -> None:
        self.event = event
        self._emit = emit
        self._publishing = False
        # An endless window (a re-run) publishes nothing by itself: the next event always carries it.
        self._timer = asyncio.create_task(self._publish_after(window)) if math.isfinite(window) else None

    async def _publish_after(self, window: float) -> None:
        await asyncio.sleep(window)
        self._publishing = True
        await self._emit(self.event)

    async def take(self) -> bus_pb2.StatusEvent | None:
        """The event, for the next one to carry; None when its window ended, once it is published."""
        if not self._publishing:
            self.drop()
            return self.event
        assert self._timer is not None
        await self._timer
        return None

    async def publish(self) -> None:
        """Publishes the event now, unless it is published already."""
        event = await self.take()
        if event is not None:
            await self._emit(event)

    def drop(self) -> None:
        """Forgets the event (the job ends without reporting it: a re-run reports it again)."""
        if self._timer is None:
            return
        if self._timer.done():
            if not self._timer.cancelled():
                # Retrieved, so a failed publish is not logged again as never retrieved.
                self._timer.exception()
            return
        self._timer.cancel()


def event_id(job_id: str, step: str, outcome: str) -> str:
    """The id (and Nats-Msg-Id) of the event for one outcome of one step of a job."""
    return str(uuid.uuid5(_EVENT_NAMESPACE, f"{job_id}/{step}/{outcome}"))


class _SupersededError(Exception):
    """Ends the job without a report: a newer release of its deployment is deployed already."""


class _StepFailedError(Exception):
    """Ends the job: the event to publish for it is ready."""

    def __init__(self, event: bus_pb2.StatusEvent, outcome: str) -> None:
        super().__init__(event.error_message)
        self.event = event
        self.outcome = outcome


class Reconciler:
    """Drives ProvisionJobs to their goal through one location's driver.

    Safe to re-run after a crash: the driver's steps recognise work already done, and the event
    ids depend only on (job, step, outcome), so republished events are dropped by the bus.
    """

    def __init__(
        self,
        driver: Driver,
        emit: Emit,
        *,
        worker_id: str,
        policy: RetryPolicy | None = None,
        sleep: Sleep = asyncio.sleep,
        heartbeat: Heartbeat = _no_heartbeat,
        report_window: float = 0.0,
        observe: StepObserver | None = None,
    ) -> None:
        if report_window < 0:
            raise ValueError("report_window must not be negative")
        self._driver = driver
        self._emit = emit
        self._source = f"provisioner/{worker_id}"
        self._policy = policy or RetryPolicy()
        self._sleep = sleep
        self._heartbeat = heartbeat
        # Real seconds a done step's event waits for the next step to be done too, so that steps done
        # in quick succession cost one event; 0: every step reports on its own.
        self._window = report_window
        self._observe = observe

    async def run(self, job: bus_pb2.ProvisionJob, *, rerun: bool = False) -> bus_pb2.StatusEvent:
        """Run the job to its end and return the last event it published (its goal, or a failure).

        A re-run (a redelivered job) holds every step's event until the plan's last step or a failure,
        the only events every run of the job publishes: whichever steps the first run reported alone or
        together, the re-run adds no event for a step the deployment has passed.
        """
        window = math.inf if rerun and self._window > 0 else self._window
        if job.operation == bus_pb2.OPERATION_DELETE:
            return await self._delete(job, window)
        plan = _PLANS.get(job.operation)
        if plan is None:
            raise ValueError(f"job {job.job_id}: unsupported operation {job.operation}")
        last, completed = await self._run(job, plan, window)
        if not completed or job.operation != bus_pb2.OPERATION_STOP:
            return last
        stopped = self._event(
            job,
            STOPPED_PHASE,
            "done",
            _Status.DEPLOYMENT_STATUS_STOPPED,
            "deployment stopped: no replica runs and the vCluster sleeps; volumes and config are kept",
        )
        stopped.conditions.append(self._condition(stopped, "Stopped", "True", "Done"))
        await self._emit(stopped)
        return stopped

    async def _delete(self, job: bus_pb2.ProvisionJob, window: float) -> bus_pb2.StatusEvent:
        if not job.deployment.is_adopted:
            steps, message = _DELETE, "deployment deleted: app, vCluster and host namespace are gone"
        elif job.force:
            steps = _DELETE_ADOPTED_FORCE
            message = "deployment deleted: the adopted namespace and its workloads are gone"
        else:
            steps = _DELETE_ADOPTED
            message = "deployment deleted: the adopted namespace was given back, its workloads still running"
        last, completed = await self._run(job, _Plan(steps, _Status.DEPLOYMENT_STATUS_DELETING), window)
        if not completed:
            return last
        final = self._event(job, DELETED_PHASE, "final", _Status.DEPLOYMENT_STATUS_DELETING, message)
        final.final = True
        await self._emit(final)
        return final

    async def _run(self, job: bus_pb2.ProvisionJob, plan: _Plan, window: float) -> tuple[bus_pb2.StatusEvent, bool]:
        """Run the steps in order; the bool says whether all of them got done."""
        context: dict[str, str] = {}
        # What quiet steps found out, for the next event to carry.
        carried = bus_pb2.StatusEvent()
        # A reported step's event waiting for the next one, within the window.
        held: _Held | None = None
        last = bus_pb2.StatusEvent()
        logs.bind(deployment_id=job.deployment.id)
        operation = bus_pb2.Operation.Name(job.operation).removeprefix("OPERATION_").lower()
        _log.info("job %s: %s, release %d, %d steps", job.job_id, operation, job.release, len(plan.steps))
        try:
            for step in plan.steps:
                # One span per step, current while its event is published: the event carries it to the API.
                attributes = {
                    tracing.DEPLOYMENT_ATTRIBUTE: job.deployment.id,
                    tracing.STEP_ATTRIBUTE: step.name,
                    "apphosting.operation": operation,
                    "apphosting.job_id": job.job_id,
                    "apphosting.release": job.release,
                }
                with tracing.span(f"reconcile {step.name}", attributes) as span:
                    started = time.perf_counter()
                    try:
                        result = await self._reconcile_step(job, step, context, plan, span)
                    except _SupersededError as superseded:
                        # Its events would say nothing true of the deployment any more: the service ignores a
                        # release other than the record's, and the newer release's job reports for it.
                        _log.info("job %s: %s", job.job_id, superseded)
                        span.add_event("superseded", {"message": str(superseded)})
                        if held is not None:
                            # What was done before is reported as it would have been.
                            await held.publish()
                            last, held = held.event, None
                        return last, False
                    except _StepFailedError as failed:
                        self._observed(step, failed.outcome, started)
                        tracing.failed(span, failed.event.error_message)
                        event = _carrying(failed.event, carried)
                        if held is not None:
                            await self._carry_held(event, held)
                            held = None
                        await self._emit(event)
                        return failed.event, False
                    self._observed(step, "done", started)
                    context.update(result.fields)
                    done = self._done_event(job, step, plan, result)
                    if step.quiet:
                        carried.MergeFrom(done)
                        continue
                    event = _carrying(done, carried)
                    carried = bus_pb2.StatusEvent()
                    if held is not None:
                        await self._carry_held(event, held)
                        held = None
                    if window > 0 and step is not plan.steps[-1]:
                        held = _Held(self._emit, event, window)
                        last = event
                        continue
                    last = event
                    await self._emit(event)
                    _log.debug("job %s: step %s done", job.job_id, step.name)
        finally:
            if held is not None:
                held.drop()
        return last, True

    def _observed(self, step: _Step, outcome: str, started: float) -> None:
        if self._observe is not None:
            self._observe(step.name, outcome, time.perf_counter() - started)

    @staticmethod
    async def _carry_held(event: bus_pb2.StatusEvent, held: _Held) -> None:
        """Puts the held event's conditions and record fields on `event`, unless its window let it out."""
        earlier = await held.take()
        if earlier is not None:
            _carrying(event, earlier)

    async def _reconcile_step(
        self, job: bus_pb2.ProvisionJob, step: _Step, context: dict[str, str], plan: _Plan, span: tracing.Span
    ) -> StepResult:
        policy = self._policy
        failures = 0
        waited = 0.0
        timeout = policy.step_timeout
        if step.rollout and job.rollout_timeout_seconds > 0:
            timeout = job.rollout_timeout_seconds
        while True:
            await self._heartbeat()
            if step.release_bound:
                await self._check_current(job, step)
            result = await self._call(job, step, context)
            if result.outcome is StepOutcome.DONE:
                return result
            if result.outcome is StepOutcome.FAIL and result.permanent:
                raise self._failure(job, step, plan, "failed", _Status.DEPLOYMENT_STATUS_FAILED, result.message)
            if result.outcome is StepOutcome.FAIL:
                failures += 1
                if failures >= policy.max_attempts:
                    message = f"step {step.name} failed after {failures} attempts: {result.message}"
                    raise self._failure(job, step, plan, "error", _Status.DEPLOYMENT_STATUS_ERROR, message)
                delay = policy.backoff(failures)
                span.add_event(
                    "retry", {"attempt": failures, "delay_seconds": delay, "error": logs.redact(result.message)}
                )
                _log.warning("job %s step %s: %s; retrying in %g s", job.job_id, step.name, result.message, delay)
                await self._wait(delay)
                continue
            # Not yet: the deadline counts the waits asked for, so it also holds with an injected sleep.
            if waited >= timeout:
                message = f"step {step.name} timed out after {timeout:g} s: {result.message}"
                raise self._failure(job, step, plan, "timeout", _Status.DEPLOYMENT_STATUS_ERROR, message)
            delay = min(max(result.after_seconds, policy.min_poll), timeout - waited)
            waited += delay
            await self._wait(delay)

    async def _check_current(self, job: bus_pb2.ProvisionJob, step: _Step) -> None:
        """Raises _SupersededError when a newer release than the job's is deployed already."""
        if job.release <= 0:
            return
        try:
            async with asyncio.timeout(self._policy.call_timeout):
                applied = await self._driver.applied_release(job)
        except Exception:
            # Not knowable now: the step itself runs, and fails or retries on the same trouble.
            _log.warning("job %s step %s: the deployed release could not be read", job.job_id, step.name, exc_info=True)
            return
        if applied > job.release:
            raise _SupersededError(f"step {step.name}: release {job.release} is superseded by release {applied}")

    async def _call(self, job: bus_pb2.ProvisionJob, step: _Step, context: dict[str, str]) -> StepResult:
        try:
            async with asyncio.timeout(self._policy.call_timeout):
                return await step.call(self._driver, job, context)
        except PermanentError as exc:
            return StepResult.fail(str(exc), permanent=True)
        except TemporaryError as exc:
            return StepResult.fail(str(exc), permanent=False)
        except TimeoutError:
            return StepResult.fail(f"driver call took longer than {self._policy.call_timeout:g} s", permanent=False)
        except Exception as exc:
            # An unexpected error (a bug, a dropped connection) is not the request's fault: retry it.
            _log.exception("job %s step %s raised", job.job_id, step.name)
            return StepResult.fail(f"{type(exc).__name__}: {exc}", permanent=False)

    async def _wait(self, seconds: float) -> None:
        # Waits are split so the bus hears from us before the job's ack wait runs out.
        remaining = seconds
        while remaining > 0:
            chunk = min(remaining, self._policy.heartbeat_interval)
            await self._sleep(chunk)
            remaining -= chunk
            await self._heartbeat()

    def _simulated(self, message: str) -> str:
        # Our messages quote the driver's, which carry the mark already: say it once, up front.
        if self._driver.simulated:
            return f"{_SIMULATED_MARK} {message.replace(f'{_SIMULATED_MARK} ', '')}"
        return message

    def _event(
        self, job: bus_pb2.ProvisionJob, phase: str, outcome: str, status: _Status.ValueType, message: str
    ) -> bus_pb2.StatusEvent:
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        return bus_pb2.StatusEvent(
            event_id=event_id(job.job_id, phase, outcome),
            deployment_id=job.deployment.id,
            status=status,
            phase=phase,
            message=self._simulated(message),
            source=self._source,
            simulated=self._driver.simulated,
            time=now,
            release=job.release,
        )

    def _done_event(
        self, job: bus_pb2.ProvisionJob, step: _Step, plan: _Plan, result: StepResult
    ) -> bus_pb2.StatusEvent:
        healthy = plan.healthy and step is plan.steps[-1]
        status = _Status.DEPLOYMENT_STATUS_RUNNING if healthy else plan.status
        event = self._event(job, step.name, "done", status, result.message)
        event.conditions.append(self._condition(event, step.condition, "True", "Done"))
        if healthy:
            event.release_healthy = True
            location = job.location
            event.provider = location.provider
            event.region = location.region
            event.location_id = location.id
            event.cluster_status = "ready"
        # Record fields a step found out go on its own event, so the record shows them as they appear.
        for name in RECORD_FIELDS:
            if name in result.fields:
                setattr(event, name, result.fields[name])
        return event

    def _failure(
        self,
        job: bus_pb2.ProvisionJob,
        step: _Step,
        plan: _Plan,
        outcome: str,
        status: _Status.ValueType,
        message: str,
    ) -> _StepFailedError:
        """The step's failure, with the event that reports it."""
        if plan.release_failure:
            # The previous release keeps serving; the service rolls back to the last healthy one.
            status = _Status.DEPLOYMENT_STATUS_RUNNING
        event = self._event(job, step.name, outcome, status, message)
        event.error_message = event.message
        event.release_failed = plan.release_failure
        reason = {"failed": "PermanentFailure", "error": "RetriesExhausted", "timeout": "Timeout"}[outcome]
        event.conditions.append(self._condition(event, step.condition, "False", reason))
        if step.cluster:
            event.cluster_status = "error"
            event.cluster_error = event.message
        return _StepFailedError(event, outcome)

    @staticmethod
    def _condition(event: bus_pb2.StatusEvent, type_: str, status: str, reason: str) -> bus_pb2.Condition:
        condition = bus_pb2.Condition(type=type_, status=status, reason=reason, message=event.message)
        condition.time.CopyFrom(event.time)
        return condition
