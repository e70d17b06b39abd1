"""The provisioner process: consumes the jobs of the locations it serves and reconciles them."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from apphosting import bus, metrics, secrets
from apphosting.locations import LocationConfig, load_locations
from apphosting.settings import DEFAULT_REPORT_WINDOW
from apphosting.v1 import bus_pb2, deployments_pb2
from provisioner.driver import Driver
from provisioner.kubernetes import KubernetesDriver
from provisioner.reconcile import STEP_NAMES, Reconciler, RetryPolicy, StepObserver, event_id
from provisioner.simulated import SimulatedDriver, SimulatedState

log = logging.getLogger(__name__)


@dataclass
class ProvisionerOptions:
    nats_url: str = "nats://127.0.0.1:4222"
    locations_file: str | None = None
    # Location ids to serve; empty: every location in the file.
    location_ids: Sequence[str] = ()
    simulate_delay: float = 0.0
    simulate_failure_rate: float = 0.0
    # A file the simulated clusters live in, shared by workers and kept across their restarts;
    # None keeps them in this process's memory.
    simulate_state: str | None = None
    # Namespaces present on every simulated location before any job, for adoption.
    simulate_namespaces: tuple[str, ...] = ()
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    # Jobs run at once by this worker, over all its locations.
    concurrency: int = 16
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    # Seconds a done step's event waits for the next step, so that steps done in quick succession cost
    # one event (a watcher still sees each step at most this late); 0: every step reports on its own.
    report_window: float = DEFAULT_REPORT_WINDOW
    # host:port serving Prometheus metrics at /metrics (port 0: any free one); None: no metrics server.
    metrics_listen: str | None = None
    # The key file that opens sealed secret values (the API's); None: jobs with secret values fail on a
    # kubernetes location, which must deliver them (the simulated driver keeps names and versions only).
    secret_key_file: str | None = None


_OPERATIONS = frozenset(name.removeprefix("OPERATION_").lower() for name in bus_pb2.Operation.keys())  # noqa: SIM118 (an enum wrapper, not a dict)


def _operation(number: bus_pb2.Operation.ValueType) -> str:
    name = bus_pb2.Operation.Name(number) if number in bus_pb2.Operation.values() else ""
    return metrics.bounded(name.removeprefix("OPERATION_").lower(), _OPERATIONS)


class _StepMetrics:
    """Reconcile step durations and outcomes by step and driver, each step timed from its start to its end."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.duration = Histogram(
            "apphosting_reconcile_step_duration_seconds",
            "Time a reconcile step took, polls and retries included",
            ("step", "driver", "outcome"),
            buckets=metrics.LIFECYCLE_BUCKETS,
            registry=registry,
        )
        self.failures = Counter(
            "apphosting_reconcile_step_failures_total",
            "Reconcile steps that ended a job unsuccessfully, by outcome (failed, error, timeout)",
            ("step", "driver", "outcome"),
            registry=registry,
        )
        self.jobs = Counter(
            "apphosting_provisioner_jobs_total",
            "Provisioning jobs run to their end by this worker, by operation and result",
            ("operation", "driver", "result"),
            registry=registry,
        )
        self.jobs_running = Gauge(
            "apphosting_provisioner_jobs_running", "Jobs this worker is running now", registry=registry
        )

    def observer(self, driver: str) -> StepObserver:
        """Counts each step a job's reconciler ends, with its driver."""

        def observed(name: str, outcome: str, seconds: float) -> None:
            step = metrics.bounded(name, STEP_NAMES)
            self.duration.labels(step, driver, outcome).observe(seconds)
            if outcome != "done":
                self.failures.labels(step, driver, outcome).inc()

        return observed


def _served(options: ProvisionerOptions) -> list[LocationConfig]:
    locations = load_locations(options.locations_file).locations
    if not options.location_ids:
        return list(locations)
    known = {location.id: location for location in locations}
    unknown = sorted(set(options.location_ids) - known.keys())
    if unknown:
        raise ValueError(f"unknown location ids: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return [known[location_id] for location_id in options.location_ids]


class Provisioner(bus.Worker):
    """One worker; several may serve the same location and share its durable consumer."""

    def __init__(self, options: ProvisionerOptions) -> None:
        super().__init__(options.nats_url, f"apphosting-provisioner-{options.worker_id}")
        self.options = options
        self.locations = _served(options)
        # Locations with cluster credentials get the kubernetes driver; the others are simulated, and
        # every event of theirs says so.
        state = SimulatedState(options.simulate_state) if options.simulate_state else None
        secret_keys = secrets.load_for_start(options.secret_key_file)
        self.drivers: dict[str, Driver] = {
            location.id: KubernetesDriver(location, secret_keys=secret_keys)
            if location.kubeconfig
            else SimulatedDriver(
                options.simulate_delay,
                options.simulate_failure_rate,
                state=state,
                existing_namespaces=options.simulate_namespaces,
            )
            for location in self.locations
        }
        self._locks = bus.KeyedLocks()
        self.registry = metrics.registry()
        self._steps = _StepMetrics(self.registry)
        self._consumers = metrics.ConsumerGauges(self.registry)
        self._refresher = metrics.Refresher([self._refresh_consumers])
        self.metrics_server: metrics.MetricsServer | None = None

    def start_metrics(self) -> metrics.MetricsServer | None:
        """Serves /metrics when options.metrics_listen says where (once; run() calls it too)."""
        if self.options.metrics_listen is not None and self.metrics_server is None:
            self.metrics_server = metrics.MetricsServer(self.registry, self.options.metrics_listen)
            self.metrics_server.start()
        return self.metrics_server

    async def run(self) -> None:
        if self.start_metrics() is not None:
            self._refresher.start()
        try:
            await super().run()
        finally:
            await self._refresher.stop()
            if self.metrics_server is not None:
                self.metrics_server.stop()
                self.metrics_server = None

    async def _refresh_consumers(self) -> None:
        if self._js is not None:
            await self._consumers.refresh(
                self._js, [(bus.JOBS_STREAM, bus.provisioner_consumer(location.id)) for location in self.locations]
            )

    def subscriptions(self) -> list[bus.Subscription]:
        return [
            bus.Subscription(
                bus.JOBS_STREAM,
                bus.provisioner_consumer(location.id),
                bus.job_subject(location.id),
                self._on_job,
                concurrency=self.options.concurrency,
                # A stopping worker returns its jobs at once; another resumes them where they were.
                hand_back=True,
            )
            for location in self.locations
        ]

    async def _emit(self, event: bus_pb2.StatusEvent) -> None:
        await bus.publish(self.js, bus.event_subject(event.deployment_id), event.SerializeToString(), event.event_id)

    async def _on_job(self, msg: Msg) -> None:
        job = bus_pb2.ProvisionJob.FromString(msg.data)
        driver = self.drivers.get(job.location.id)
        if driver is None:
            log.error("job %s is for location %s, which this worker does not serve", job.job_id, job.location.id)
            await msg.nak(delay=5.0)
            return

        kind = "simulated" if driver.simulated else "kubernetes"
        operation = _operation(job.operation)
        # One deployment's jobs (its create, then its delete) run one after the other.
        async with self._locks.hold(job.deployment.id):
            # The consumer reports the job in progress while it runs, so no heartbeat is wired in here.
            reconciler = Reconciler(
                driver,
                self._emit,
                worker_id=self.options.worker_id,
                policy=self.options.policy,
                report_window=self.options.report_window,
                observe=self._steps.observer(kind),
            )
            self._steps.jobs_running.inc()
            try:
                await reconciler.run(job, rerun=msg.metadata.num_delivered > 1)
                self._steps.jobs.labels(operation, kind, "finished").inc()
            except Exception as exc:
                if not bus.last_delivery(msg):
                    self._steps.jobs.labels(operation, kind, "redelivered").inc()
                    raise
                self._steps.jobs.labels(operation, kind, "gave_up").inc()
                # JetStream gives up on the job now; the deployment must not stay in progress for ever.
                await self._emit(_gave_up(job, self.options.worker_id, exc))
            finally:
                self._steps.jobs_running.dec()
        await msg.ack()


def _gave_up(job: bus_pb2.ProvisionJob, worker_id: str, error: Exception) -> bus_pb2.StatusEvent:
    message = f"provisioning gave up after {bus.MAX_DELIVER} deliveries of job {job.job_id}: {error}"
    event = bus_pb2.StatusEvent(
        event_id=event_id(job.job_id, "job", "gave_up"),
        deployment_id=job.deployment.id,
        status=deployments_pb2.DEPLOYMENT_STATUS_ERROR,
        phase="job",
        message=message,
        source=f"provisioner/{worker_id}",
        error_message=message,
    )
    event.time.GetCurrentTime()
    return event


async def serve(options: ProvisionerOptions, stop: asyncio.Event) -> None:
    provisioner = Provisioner(options)
    served = ", ".join(
        f"{location.id} ({'kubernetes' if location.kubeconfig else 'simulated'})" for location in provisioner.locations
    )
    print(f"provisioner {options.worker_id}: {served}", flush=True)
    if (metrics_server := provisioner.start_metrics()) is not None:
        print(f"provisioner {options.worker_id}: metrics on {metrics_server.url}", flush=True)
    await provisioner.serve(stop)
