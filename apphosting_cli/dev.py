"""`apphosting dev`: the whole platform in one process tree on one machine, for trying it out."""

from __future__ import annotations

import asyncio
import os
import secrets
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

from apphosting import metrics
from apphosting.imageupdates import UPDATER_ACTOR
from apphosting.nats_server import NatsServer, free_port
from apphosting.settings import DEFAULT_REPORT_WINDOW
from apphosting_cli.rest import RestGateway, RestOptions
from apphosting_client import ClientConfig
from provisioner.worker import Provisioner, ProvisionerOptions
from scheduler.service import Scheduler, SchedulerOptions
from services.deployments.app import ApiOptions, ApiServer
from services.deployments.auth import LOCAL_USER_ID, NOT_CONFIGURED, JwtVerifier, mint_token
from updater.service import Updater, UpdaterOptions

DEV_TOKEN_TTL = timedelta(days=30)


@dataclass
class DevOptions:
    # An absolute path; the command line resolves it.
    data_dir: str = ".apphosting"
    locations_file: str | None = None
    simulate_delay: float = 0.5
    simulate_failure_rate: float = 0.0
    # Default: a file in data_dir, so the simulated clusters survive a restart like the records do.
    simulate_state: str | None = None
    simulate_namespaces: tuple[str, ...] = ()
    report_window: float = DEFAULT_REPORT_WINDOW
    # JetStream fsync interval: None is the server's default (2 minutes), "always" every write.
    nats_sync_interval: str | None = None
    # The API's address, auth, TLS, quotas and limits; dev sets its database, NATS and locations, and
    # without auth, a dev key.
    api: ApiOptions = field(default_factory=ApiOptions)
    # The REST gateway's address (host:port, port 0: any free one); None: no gateway.
    rest_listen: str | None = "127.0.0.1:8080"
    # Where the API serves its Prometheus metrics; the scheduler, the provisioner and the REST gateway
    # take the next ports (each process has its own registry). A port already taken becomes a free one.
    # None: no metrics servers.
    metrics_listen: str | None = metrics.DEV_METRICS_LISTEN
    # Seconds between the image updater's rounds.
    updater_interval: float = 300.0
    # The key file of secret environment values; None: data_dir/secret-keys.json, made on first use.
    secret_key_file: str | None = None


def metrics_addresses(listen: str | None) -> dict[str, str | None]:
    """The metrics address of each of dev's processes: consecutive ports, or a free one where taken."""
    names = ("api", "scheduler", "provisioner", "rest", "updater")
    if listen is None:
        return dict.fromkeys(names)
    addresses: dict[str, str | None] = {}
    for offset, name in enumerate(names):
        address = metrics.next_listen(listen, offset)
        addresses[name] = address if metrics.port_free(address) else metrics.any_port(address)
    return addresses


def dev_secret_key_file(data: Path) -> str:
    """The dev key file of secret environment values (made once, kept in data_dir)."""
    key_file = data / "secret-keys.json"
    if not key_file.exists():
        from apphosting import secrets as secret_keys

        secret_keys.new_key_file(key_file)
    return str(key_file)


def dev_auth(data: Path) -> tuple[JwtVerifier, str]:
    """The dev key (made once, kept in data_dir) and a fresh token for the local user, also kept there."""
    key_file = data / "dev-jwt-secret"
    if not key_file.exists():
        data.mkdir(parents=True, exist_ok=True)
        # 0600 from the start: the key signs tokens for anyone who can read it.
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32) + "\n")
    secret = key_file.read_bytes().strip()
    token = mint_token(secret, LOCAL_USER_ID, ttl=DEV_TOKEN_TTL)
    token_file = data / "dev-token"
    token_file.touch(mode=0o600)
    token_file.write_text(token + "\n")
    # The image updater's service token, of the same key.
    updater_file = data / "updater-token"
    updater_file.touch(mode=0o600)
    updater_file.write_text(mint_token(secret, UPDATER_ACTOR, ttl=DEV_TOKEN_TTL) + "\n")
    return JwtVerifier.from_secret(secret), token


def _metrics_lines(
    api: ApiServer, scheduler: Scheduler, provisioner: Provisioner, rest: RestGateway | None, updater: Updater | None
) -> str:
    servers = [
        ("api", api.metrics_server),
        ("scheduler", scheduler.metrics_server),
        ("provisioner", provisioner.metrics_server),
        ("rest", rest.metrics_server if rest is not None else None),
        ("updater", updater.metrics_server if updater is not None else None),
    ]
    shown = [f"{name} {server.url}" for name, server in servers if server is not None]
    return "\n  metrics    " + "\n             ".join(shown) if shown else ""


async def serve(options: DevOptions, stop: asyncio.Event) -> None:
    """Starts nats-server, the API, the scheduler, a simulated provisioner and the image updater; stops them all
    on `stop`."""
    data = Path(options.data_dir)
    # Free ports, not 4222 and 8222: a system NATS may already hold those.
    nats = NatsServer(data / "nats", sync_interval=options.nats_sync_interval, monitor_port=free_port())
    await asyncio.to_thread(nats.start)
    database_url = f"sqlite+aiosqlite:///{data / 'apphosting.db'}"
    served = metrics_addresses(options.metrics_listen)
    secret_key_file = options.secret_key_file or dev_secret_key_file(data)
    api_options = replace(
        options.api,
        database_url=database_url,
        nats_url=nats.url,
        locations_file=options.locations_file,
        metrics_listen=served["api"],
        secret_key_file=secret_key_file,
    )
    token = None
    if api_options.auth is NOT_CONFIGURED:
        verifier, token = dev_auth(data)
        api_options = replace(api_options, auth=verifier)
    api = ApiServer(api_options)
    scheduler = Scheduler(
        SchedulerOptions(
            nats_url=nats.url,
            database_url=database_url,
            locations_file=options.locations_file,
            metrics_listen=served["scheduler"],
        )
    )
    provisioner = Provisioner(
        ProvisionerOptions(
            nats_url=nats.url,
            locations_file=options.locations_file,
            simulate_delay=options.simulate_delay,
            simulate_failure_rate=options.simulate_failure_rate,
            simulate_state=options.simulate_state or str(data / "simulated-clusters.db"),
            simulate_namespaces=options.simulate_namespaces,
            report_window=options.report_window,
            metrics_listen=served["provisioner"],
            secret_key_file=secret_key_file,
        )
    )
    tasks: list[asyncio.Task[None]] = []
    rest: RestGateway | None = None
    updater: Updater | None = None
    updater_stop = asyncio.Event()
    try:
        port = await api.start()
        scheduler.start_metrics()
        provisioner.start_metrics()
        tasks = [asyncio.create_task(scheduler.run()), asyncio.create_task(provisioner.run())]
        host = api_options.listen.rsplit(":", 1)[0]
        if options.rest_listen is not None:
            # The gateway forwards each caller's token. With TLS on the API, its certificate is trusted as
            # the root: dev's certificates are typically self-signed.
            client = ClientConfig(
                address=f"{host}:{port}", tls=api_options.tls_cert is not None, ca_file=api_options.tls_cert
            )
            rest = RestGateway(RestOptions(listen=options.rest_listen, client=client, metrics_listen=served["rest"]))
            await rest.start()
        # The updater runs with its service token of the dev key, or as the local user without auth; with an
        # operator's own key dev cannot mint its token, and it is not started.
        if token is not None or api_options.auth is None:
            client = ClientConfig(
                address=f"{host}:{port}",
                tls=api_options.tls_cert is not None,
                ca_file=api_options.tls_cert,
                token_file=str(data / "updater-token") if token is not None else None,
            )
            updater = Updater(
                UpdaterOptions(
                    client=client,
                    interval=options.updater_interval,
                    registries=api_options.registries,
                    metrics_listen=served["updater"],
                    locations_file=options.locations_file,
                )
            )
            updater.start_metrics()
            tasks.append(asyncio.create_task(updater.run(updater_stop)))
        print(
            f"apphosting dev is running (Ctrl-C stops it)\n"
            f"  API        grpc://{host}:{port}  (apphosting.v1.DeploymentService, health, reflection)\n"
            + (f"  REST       {rest.url}  (OpenAPI at {rest.url}/openapi.json, docs at /docs)\n" if rest else "")
            + f"  NATS       {nats.url}  (JetStream files in {data / 'nats'}, monitoring {nats.monitor_url})\n"
            f"  database   {data / 'apphosting.db'}\n"
            f"  scheduler  {len(scheduler.locations)} locations in "
            f"{', '.join(sorted({loc.geographic_region for loc in scheduler.locations}))}\n"
            f"  provisioner {provisioner.options.worker_id}: simulated driver, "
            f"{options.simulate_delay} s per step, failure rate {options.simulate_failure_rate}"
            + (
                f"\n  updater    image updates every {options.updater_interval:g} s"
                if updater is not None
                else "\n  updater    not started: dev mints its token only with its own dev key"
            )
            + _metrics_lines(api, scheduler, provisioner, rest, updater),
            flush=True,
        )
        if token is not None:
            print(
                f"  auth       dev key {data / 'dev-jwt-secret'} (HS256); a token for user {LOCAL_USER_ID},\n"
                f"             valid {DEV_TOKEN_TTL.days} days, is in {data / 'dev-token'}:\n\n"
                f"  export TOKEN={token}\n"
                f"  export APPHOSTING_ADDR={host}:{port} APPHOSTING_TOKEN_FILE={data / 'dev-token'}\n\n"
                "  then create the example deployment with one of (a second one of the same name is refused):\n"
                "  apphosting deploy -f examples/create-deployment.json --wait\n"
                f'  grpcurl -plaintext -H "authorization: Bearer $TOKEN" -d @ {host}:{port} '
                "apphosting.v1.DeploymentService/CreateAppHostingDeployment < examples/create-deployment.json"
                + (
                    f'\n  curl -H "Authorization: Bearer $TOKEN" -H "Content-Type: application/json" '
                    f"--data @examples/create-deployment.json {rest.url}/deployments/app-hosting"
                    if rest
                    else ""
                ),
                flush=True,
            )
        elif api_options.auth is None:
            print("  auth       none (--insecure-no-auth): every caller is the one local user", flush=True)
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({stopped, *tasks}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
    finally:
        updater_stop.set()
        if rest is not None:
            await rest.stop()
        await api.stop()
        scheduler.stop()
        provisioner.stop()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if updater is not None:
            await updater.close()
        await asyncio.to_thread(nats.stop)
        print("apphosting dev stopped", flush=True)
