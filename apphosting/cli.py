"""The `apphosting` command: runs the API, the scheduler, a provisioner, or all of them on one machine."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence

from apphosting.settings import DEFAULT_DATABASE_URL, DEFAULT_LISTEN

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


def _add_common(parser: argparse.ArgumentParser, *, database: bool = True) -> None:
    parser.add_argument("--nats-url", default=DEFAULT_NATS_URL, help=f"NATS server (default {DEFAULT_NATS_URL})")
    if database:
        parser.add_argument(
            "--database-url",
            default=DEFAULT_DATABASE_URL,
            help="SQLAlchemy URL: a SQLite file (default ./apphosting.db) or postgresql://user@host/db",
        )
    parser.add_argument("--locations", default=None, help="locations YAML file (default: the sample locations)")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _add_provisioner_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--simulate-delay", type=_seconds, default=0.5, help="seconds each simulated step takes (default 0.5)"
    )
    parser.add_argument(
        "--simulate-failure-rate",
        type=_probability,
        default=0.0,
        help="chance (0-1) that a simulated app fails to deploy (default 0)",
    )
    parser.add_argument(
        "--simulate-state",
        default=None,
        help="SQLite file holding the simulated clusters, shared by workers and kept across restarts",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apphosting", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    api = commands.add_parser("api", help="run the gRPC DeploymentService")
    api.add_argument("--listen", default=DEFAULT_LISTEN, help=f"address to serve on (default {DEFAULT_LISTEN})")
    _add_common(api)

    scheduler = commands.add_parser("scheduler", help="run the scheduler (placement of deployments)")
    _add_common(scheduler)

    provisioner = commands.add_parser("provisioner", help="run a provisioner worker")
    _add_common(provisioner, database=False)
    _add_provisioner_options(provisioner)
    provisioner.add_argument(
        "--location",
        action="append",
        default=[],
        dest="location_ids",
        help="serve this location id (repeatable; default: every location)",
    )

    dev = commands.add_parser(
        "dev", help="run everything on this machine: nats-server, the API, the scheduler and a provisioner"
    )
    dev.add_argument("--listen", default=DEFAULT_LISTEN, help=f"API address (default {DEFAULT_LISTEN})")
    dev.add_argument("--data-dir", default=".apphosting", help="where the database and NATS keep their files")
    dev.add_argument("--locations", default=None, help="locations YAML file (default: the sample locations)")
    dev.add_argument("--log-level", default="WARNING")
    dev.add_argument(
        "--nats-sync-interval",
        default=None,
        help="how often JetStream fsyncs: 'always' (every write, slower) or a duration like 10s "
        "(default: the server's 2m; see docs/design.md, Durability)",
    )
    _add_provisioner_options(dev)

    migrate = commands.add_parser("migrate", help="bring every service's tables up to date and exit")
    migrate.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    migrate.add_argument("--log-level", default="INFO")
    return parser


def _run(main: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Runs until SIGINT or SIGTERM, which ask for a graceful stop."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    asyncio.run(runner())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "api":
        from services.deployments.app import ApiOptions, serve

        options = ApiOptions(
            listen=args.listen,
            database_url=args.database_url,
            nats_url=args.nats_url,
            locations_file=args.locations,
        )
        return _run(lambda stop: serve(options, stop))
    if args.command == "scheduler":
        from scheduler.service import SchedulerOptions
        from scheduler.service import serve as serve_scheduler

        scheduler_options = SchedulerOptions(
            nats_url=args.nats_url, database_url=args.database_url, locations_file=args.locations
        )
        return _run(lambda stop: serve_scheduler(scheduler_options, stop))
    if args.command == "provisioner":
        from provisioner.worker import ProvisionerOptions
        from provisioner.worker import serve as serve_provisioner

        provisioner_options = ProvisionerOptions(
            nats_url=args.nats_url,
            locations_file=args.locations,
            location_ids=args.location_ids,
            simulate_delay=args.simulate_delay,
            simulate_failure_rate=args.simulate_failure_rate,
            simulate_state=args.simulate_state,
        )
        return _run(lambda stop: serve_provisioner(provisioner_options, stop))
    if args.command == "dev":
        from apphosting.dev import DevOptions, run_dev

        dev_options = DevOptions(
            listen=args.listen,
            data_dir=os.path.abspath(args.data_dir),
            locations_file=args.locations,
            simulate_delay=args.simulate_delay,
            simulate_failure_rate=args.simulate_failure_rate,
            simulate_state=args.simulate_state,
            nats_sync_interval=args.nats_sync_interval,
        )
        return _run(lambda stop: run_dev(dev_options, stop))
    if args.command == "migrate":
        from apphosting import db
        from scheduler import ledger
        from services.deployments import app

        async def migrate(_: asyncio.Event) -> None:
            engine = db.make_engine(args.database_url)
            # Each service owns its tables and its migration history.
            await db.upgrade(engine, app.MIGRATIONS, app.VERSION_TABLE)
            await db.upgrade(engine, ledger.MIGRATIONS, ledger.VERSION_TABLE)
            await engine.dispose()
            print("database schema is up to date")

        return _run(migrate)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
