"""The `apphosting` command: runs the API, the scheduler, a provisioner, or all of them on one machine."""

from __future__ import annotations

import argparse
import asyncio
import logging
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apphosting", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    api = commands.add_parser("api", help="run the gRPC DeploymentService")
    api.add_argument("--listen", default=DEFAULT_LISTEN, help=f"address to serve on (default {DEFAULT_LISTEN})")
    _add_common(api)

    migrate = commands.add_parser("migrate", help="bring the database schema up to date and exit")
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
    if args.command == "migrate":
        from apphosting import db
        from services.deployments.app import MIGRATIONS, VERSION_TABLE

        async def migrate(_: asyncio.Event) -> None:
            engine = db.make_engine(args.database_url)
            await db.upgrade(engine, MIGRATIONS, VERSION_TABLE)
            await engine.dispose()
            print("database schema is up to date")

        return _run(migrate)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
