"""The provisioner process: consumes the jobs of the locations it serves and reconciles them."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

from nats.aio.msg import Msg

from apphosting import bus
from apphosting.locations import LocationConfig, load_locations
from apphosting.v1 import bus_pb2, deployments_pb2
from provisioner.driver import Driver
from provisioner.kubernetes import KubernetesDriver
from provisioner.reconcile import Reconciler, RetryPolicy, event_id
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
        self.drivers: dict[str, Driver] = {
            location.id: KubernetesDriver(location)
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

        # The consumer reports the job in progress while it runs, so no heartbeat is wired in here.
        reconciler = Reconciler(driver, self._emit, worker_id=self.options.worker_id, policy=self.options.policy)
        # One deployment's jobs (its create, then its delete) run one after the other.
        async with self._locks.hold(job.deployment.id):
            try:
                await reconciler.run(job)
            except Exception as exc:
                if not bus.last_delivery(msg):
                    raise
                # JetStream gives up on the job now; the deployment must not stay in progress for ever.
                await self._emit(_gave_up(job, self.options.worker_id, exc))
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
    await provisioner.serve(stop)
