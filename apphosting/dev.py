"""`apphosting dev`: the whole platform in one process tree on one machine, for trying it out."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from apphosting.nats_server import NatsServer
from apphosting.settings import DEFAULT_LISTEN
from provisioner.worker import Provisioner, ProvisionerOptions
from scheduler.service import Scheduler, SchedulerOptions
from services.deployments.app import ApiOptions, ApiServer


@dataclass
class DevOptions:
    listen: str = DEFAULT_LISTEN
    # An absolute path; the command line resolves it.
    data_dir: str = ".apphosting"
    locations_file: str | None = None
    simulate_delay: float = 0.5
    simulate_failure_rate: float = 0.0
    # Default: a file in data_dir, so the simulated clusters survive a restart like the records do.
    simulate_state: str | None = None
    # JetStream fsync interval: None is the server's default (2 minutes), "always" every write.
    nats_sync_interval: str | None = None


async def run_dev(options: DevOptions, stop: asyncio.Event) -> None:
    """Starts nats-server, the API, the scheduler and a simulated provisioner; stops them all on `stop`."""
    data = Path(options.data_dir)
    # A free port, not 4222: a system NATS may already hold that one.
    nats = NatsServer(data / "nats", sync_interval=options.nats_sync_interval)
    await asyncio.to_thread(nats.start)
    database_url = f"sqlite+aiosqlite:///{data / 'apphosting.db'}"
    api = ApiServer(
        ApiOptions(
            listen=options.listen,
            database_url=database_url,
            nats_url=nats.url,
            locations_file=options.locations_file,
        )
    )
    scheduler = Scheduler(
        SchedulerOptions(nats_url=nats.url, database_url=database_url, locations_file=options.locations_file)
    )
    provisioner = Provisioner(
        ProvisionerOptions(
            nats_url=nats.url,
            locations_file=options.locations_file,
            simulate_delay=options.simulate_delay,
            simulate_failure_rate=options.simulate_failure_rate,
            simulate_state=options.simulate_state or str(data / "simulated-clusters.db"),
        )
    )
    tasks: list[asyncio.Task[None]] = []
    try:
        port = await api.start()
        tasks = [asyncio.create_task(scheduler.run()), asyncio.create_task(provisioner.run())]
        host = options.listen.rsplit(":", 1)[0]
        print(
            f"apphosting dev is running (Ctrl-C stops it)\n"
            f"  API        grpc://{host}:{port}  (apphosting.v1.DeploymentService, health, reflection)\n"
            f"  NATS       {nats.url}  (JetStream files in {data / 'nats'})\n"
            f"  database   {data / 'apphosting.db'}\n"
            f"  scheduler  {len(scheduler.locations)} locations in "
            f"{', '.join(sorted({loc.geographic_region for loc in scheduler.locations}))}\n"
            f"  provisioner {provisioner.options.worker_id}: simulated driver, "
            f"{options.simulate_delay} s per step, failure rate {options.simulate_failure_rate}",
            flush=True,
        )
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({stopped, *tasks}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
    finally:
        await api.stop()
        scheduler.stop()
        provisioner.stop()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.to_thread(nats.stop)
        print("apphosting dev stopped", flush=True)
