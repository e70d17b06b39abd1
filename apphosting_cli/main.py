"""The `apphosting` command: runs the API, the scheduler, a provisioner, or all of them on one machine; its
user commands (deploy, get, list, ...) are in apphosting_cli.user."""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import ipaddress
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from apphosting import CannotStart, logs, tracing
from apphosting.settings import DEFAULT_DATABASE_URL, DEFAULT_LISTEN, DEFAULT_REPORT_WINDOW
from apphosting_cli.exits import EXIT_CODES
from services.deployments import defaults

# Each command imports only the process it runs (a provisioner never loads the API's code), so the
# imports of the processes are inside the functions below.
if TYPE_CHECKING:
    from apphosting.imageupdates import RegistryAccess
    from services.deployments.app import ApiOptions

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


def _add_metrics(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument(
        "--metrics-listen",
        default=default,
        metavar="ADDR",
        help="serve Prometheus metrics at http://ADDR/metrics (host:port; port 0: any free one)"
        + (
            f"; default {default}, then the next ports for each process, 'off' serves none"
            if default
            else "; default: off"
        ),
    )


def _add_registry_options(parser: argparse.ArgumentParser) -> None:
    """How the process reaches image registries: the one definition the API and the updater share."""
    group = parser.add_argument_group("image registries (image update previews and the updater)")
    group.add_argument(
        "--registry-credentials-file",
        default=None,
        metavar="PATH",
        help="credentials per registry host in Docker config.json format (auths; see docs/image-updates.md)",
    )
    group.add_argument(
        "--registry-plain-http",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="speak plain HTTP to this registry (loopback registries only; repeatable)",
    )


def _registry_access(args: argparse.Namespace) -> RegistryAccess:
    from apphosting.imageupdates import RegistryAccess

    access = RegistryAccess(args.registry_credentials_file, tuple(args.registry_plain_http))
    try:
        access.credentials()
    except ValueError as unusable:
        build_parser().error(f"--registry-credentials-file: {unusable}")
    return access


def _add_log_format(parser: argparse.ArgumentParser, default: str = "json") -> None:
    parser.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        default=default,
        help=f"json lines (for log collectors) or console (for people at a terminal); default {default}",
    )


def _add_common(parser: argparse.ArgumentParser, *, database: bool = True) -> None:
    parser.add_argument(
        "--nats-url",
        action="append",
        default=None,
        metavar="URL[,URL...]",
        help=f"NATS server, or a cluster's servers: comma-separated or the flag repeated (default {DEFAULT_NATS_URL})",
    )
    parser.add_argument(
        "--stream-replicas",
        type=int,
        choices=range(1, 6),
        default=None,
        metavar="N",
        help="replicas of each JetStream stream this process creates (default: 3 on a NATS cluster, 1 on one server);"
        " an existing stream keeps its own, with a warning",
    )
    if database:
        parser.add_argument(
            "--database-url",
            default=DEFAULT_DATABASE_URL,
            help="SQLAlchemy URL: a SQLite file (default ./apphosting.db) or postgresql://user@host/db",
        )
    parser.add_argument("--locations", default=None, help="locations YAML file (default: the sample locations)")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    _add_log_format(parser)
    _add_nats_security(parser)
    _add_metrics(parser)


def _add_secret_key_file(parser: argparse.ArgumentParser, *, help_extra: str = "") -> None:
    """The key file of secret environment values: one flag for the API (seals) and the provisioner (opens)."""
    parser.add_argument(
        "--secret-key-file",
        default=os.environ.get("APPHOSTING_SECRET_KEY_FILE"),
        metavar="PATH",
        help="key file of secret environment values (make one with `apphosting secrets new-key-file PATH`; "
        "default: APPHOSTING_SECRET_KEY_FILE)" + help_extra,
    )


def _add_nats_security(parser: argparse.ArgumentParser) -> None:
    nats = parser.add_argument_group("NATS credentials and TLS")
    nats.add_argument("--nats-creds", default=None, help="NATS credentials file (user JWT and nkey seed)")
    nats.add_argument("--nats-nkey-seed", default=None, help="NATS nkey seed file")
    nats.add_argument("--nats-tls-ca", default=None, help="CA bundle (PEM) that signed the NATS server's certificate")
    nats.add_argument("--nats-tls-cert", default=None, help="client certificate (PEM) for mutual TLS with NATS")
    nats.add_argument("--nats-tls-key", default=None, help="key (PEM) of --nats-tls-cert")


def _use_nats_security(args: argparse.Namespace) -> None:
    from apphosting import bus

    bus.use_security(
        bus.NatsSecurity(
            creds_file=args.nats_creds,
            nkey_seed_file=args.nats_nkey_seed,
            tls_ca_file=args.nats_tls_ca,
            tls_cert_file=args.nats_tls_cert,
            tls_key_file=args.nats_tls_key,
        )
    )


def _use_nats_cluster(args: argparse.Namespace) -> None:
    """One comma-separated --nats-url from every one given, and the stream replicas asked for."""
    from apphosting import bus

    args.nats_url = ",".join(url for given in args.nats_url or [DEFAULT_NATS_URL] for url in bus.server_urls(given))
    bus.use_stream_replicas(args.stream_replicas)


def _limit(kind: Callable[[str], float]) -> Callable[[str], float | None]:
    def parse(text: str) -> float | None:
        if text == "unlimited":
            return None
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be 0 or more, or 'unlimited'; got {text}")
        return value

    return parse


def _add_api_security(parser: argparse.ArgumentParser, *, dev: bool = False) -> None:
    """Authentication, TLS, quotas, resync and input allow-lists of the API (see the README's Security section)."""
    auth = parser.add_argument_group("authentication (Bearer JWT on every call but health and reflection)")
    keys = auth.add_mutually_exclusive_group(required=False)
    keys.add_argument("--jwt-secret-file", default=None, help="HS256 secret (at least 32 bytes)")
    keys.add_argument("--jwt-public-key-file", default=None, help="PEM public key: RSA (RS256) or EC (ES256)")
    keys.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="no authentication: every caller is one local user (local use only)"
        + ("" if dev else "; required when no JWT key is given"),
    )
    auth.add_argument(
        "--allow-insecure-remote",
        action="store_true",
        help="allow --insecure-no-auth on an address other machines can reach (refused without it)",
    )
    auth.add_argument("--jwt-audience", default=None, help="require this aud claim")
    auth.add_argument("--jwt-issuer", default=None, help="require this iss claim")
    oidc = parser.add_argument_group("tokens of an OIDC issuer, beside or instead of a JWT key (docs/api.md)")
    oidc.add_argument("--oidc-issuer", default=None, metavar="URL", help="the issuer (its iss); keys by discovery")
    oidc.add_argument("--oidc-audience", default=None, help="the aud the tokens must carry (needed with --oidc-issuer)")
    oidc.add_argument("--oidc-jwks-url", default=None, metavar="URL", help="the JWKS, instead of discovery")
    oidc.add_argument("--oidc-algorithms", default="RS256,ES256", help="accepted algorithms (default RS256,ES256)")
    oidc.add_argument("--oidc-user-claim", default="sub", help="the claim naming the user (default sub)")
    oidc.add_argument(
        "--oidc-user-id",
        choices=("issuer-subject", "claim"),
        default="issuer-subject",
        help="user id: a UUID of issuer and claim (default), or the claim itself (a UUID)",
    )
    oidc.add_argument("--oidc-admin-claim", default=None, help="a claim (dotted path) that makes a caller an admin")
    oidc.add_argument("--oidc-admin-value", default=None, help="the value (or list member) of --oidc-admin-claim")
    oidc.add_argument(
        "--oidc-cache-lifespan", type=_positive_seconds, default=300.0, help="seconds keys are kept (default 300)"
    )
    oidc.add_argument(
        "--oidc-refetch-cooldown",
        type=_seconds,
        default=30.0,
        help="least seconds between two fetches of the keys for an unknown kid (default 30)",
    )
    tls = parser.add_argument_group("TLS")
    tls.add_argument("--tls-cert", default=None, help="server certificate chain (PEM); without it, plaintext")
    tls.add_argument("--tls-key", default=None, help="key (PEM) of --tls-cert")
    tls.add_argument("--tls-client-ca", default=None, help="CA (PEM) for client certificates: mutual TLS")
    quotas = parser.add_argument_group("per-user quotas over live deployments ('unlimited' lifts one)")
    quotas.add_argument("--quota-deployments", type=_limit(int), default=defaults.QUOTA_DEPLOYMENTS)
    quotas.add_argument("--quota-cpu", type=_limit(float), default=defaults.QUOTA_CPU, help="cores")
    quotas.add_argument("--quota-memory-mb", type=_limit(int), default=defaults.QUOTA_MEMORY_MB)
    quotas.add_argument("--quota-storage-gb", type=_limit(int), default=defaults.QUOTA_STORAGE_GB)
    quotas.add_argument(
        "--quota-stored-mb",
        type=_limit(int),
        default=defaults.QUOTA_STORED_MB,
        help="MiB of records and kept history in the database",
    )
    quotas.add_argument("--no-quotas", action="store_true", help="no quota at all")
    resync = parser.add_argument_group("resync of deployments whose request or job was lost")
    resync.add_argument(
        "--stuck-after",
        type=_positive_seconds,
        default=defaults.STUCK_AFTER,
        help=f"seconds without progress after which a pending, provisioning or deleting deployment is driven "
        f"again (default {defaults.STUCK_AFTER:g})",
    )
    resync.add_argument(
        "--resync-interval",
        type=_positive_seconds,
        default=defaults.RESYNC_INTERVAL,
        help=f"seconds between two looks for stuck deployments (default {defaults.RESYNC_INTERVAL:g})",
    )
    resync.add_argument(
        "--max-redrives",
        type=_count,
        default=defaults.MAX_REDRIVES,
        help=f"times a stuck deployment is driven again before it ends in error (default {defaults.MAX_REDRIVES})",
    )
    parser.add_argument(
        "--rollout-timeout",
        type=_positive_seconds,
        default=defaults.ROLLOUT_TIMEOUT,
        help="seconds a new release may take to become healthy before it is rolled back to the last healthy "
        f"one (default {defaults.ROLLOUT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--deleted-retention",
        type=_seconds,
        default=defaults.DELETED_RETENTION,
        help="seconds a deleted deployment's record and history are kept, counted in --quota-stored-mb, "
        f"before they are purged (default {defaults.DELETED_RETENTION:g}: 7 days)",
    )
    hardening = parser.add_argument_group("input")
    hardening.add_argument(
        "--helm-repo-host",
        action="append",
        default=[],
        help="allow helm_repo_url only on this host or *.domain (repeatable; default: any public host)",
    )
    hardening.add_argument(
        "--image-registry",
        action="append",
        default=[],
        help="allow docker_image only from this registry host[:port] or *.domain (repeatable; default: any)",
    )
    hardening.add_argument(
        "--max-request-bytes", type=int, default=1 << 20, help="largest request accepted (default 1 MiB)"
    )


def _api_options(args: argparse.Namespace) -> ApiOptions:
    """The API's options from the flags of _add_api_security; without a JWT key, auth stays unset."""
    from apphosting.settings import Limits
    from services.deployments.app import ApiOptions
    from services.deployments.auth import (
        NOT_CONFIGURED,
        JwtVerifier,
        OidcVerifier,
        Unset,
        UserIdMapping,
        VerifierChain,
    )
    from services.deployments.quotas import UNLIMITED, Quotas

    auth: JwtVerifier | Unset | None = NOT_CONFIGURED
    verifiers: list[JwtVerifier] = []
    if args.jwt_secret_file or args.jwt_public_key_file:
        try:
            verifiers.append(
                JwtVerifier.from_files(
                    secret_file=args.jwt_secret_file,
                    public_key_file=args.jwt_public_key_file,
                    audience=args.jwt_audience,
                    issuer=args.jwt_issuer,
                )
            )
        except (OSError, ValueError) as exc:
            build_parser().error(f"cannot use the JWT key: {exc}")
    if args.oidc_issuer:
        if args.insecure_no_auth:
            build_parser().error("--insecure-no-auth and --oidc-issuer exclude each other: choose one")
        if not args.oidc_audience:
            build_parser().error("--oidc-issuer needs --oidc-audience: the aud its tokens carry for this API")
        try:
            verifiers.append(
                OidcVerifier(
                    args.oidc_issuer,
                    args.oidc_audience,
                    jwks_url=args.oidc_jwks_url,
                    algorithms=[name.strip() for name in args.oidc_algorithms.split(",") if name.strip()],
                    user_claim=args.oidc_user_claim,
                    user_id_mapping=UserIdMapping(args.oidc_user_id),
                    admin_claim=args.oidc_admin_claim,
                    admin_value=args.oidc_admin_value,
                    cache_lifespan=args.oidc_cache_lifespan,
                    refetch_cooldown=args.oidc_refetch_cooldown,
                )
            )
        except ValueError as exc:
            build_parser().error(f"cannot use the OIDC issuer: {exc}")
    if args.insecure_no_auth:
        auth = None
    elif verifiers:
        auth = verifiers[0] if len(verifiers) == 1 else VerifierChain(verifiers)
    quotas = (
        UNLIMITED
        if args.no_quotas
        else Quotas(
            deployments=args.quota_deployments,
            cpu=args.quota_cpu,
            memory_mb=args.quota_memory_mb,
            storage_gb=args.quota_storage_gb,
            stored_mb=args.quota_stored_mb,
        )
    )
    return ApiOptions(
        listen=args.listen,
        locations_file=args.locations,
        auth=auth,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        quotas=quotas,
        max_request_bytes=args.max_request_bytes,
        stuck_after=args.stuck_after,
        resync_interval=args.resync_interval,
        max_redrives=args.max_redrives,
        deleted_retention=args.deleted_retention,
        rollout_timeout=args.rollout_timeout,
        limits=Limits(helm_repo_hosts=tuple(args.helm_repo_host), image_registries=tuple(args.image_registry)),
        registries=_registry_access(args),
    )


def _is_loopback(listen: str) -> bool:
    """Whether only this machine can reach a gRPC listen address (host:port, [v6]:port or unix:path)."""
    if listen.startswith(("unix:", "unix-abstract:")):
        return True
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        # A host name may resolve to any address: only a literal loopback address is known local.
        return False


def _check_insecure_remote(command: str, args: argparse.Namespace) -> str | None:
    """Refuses --insecure-no-auth beyond loopback unless --allow-insecure-remote says so; then warns."""
    if not args.insecure_no_auth or _is_loopback(args.listen):
        return None
    if not args.allow_insecure_remote:
        return (
            f"--insecure-no-auth on {args.listen}, which other machines can reach, lets anyone act as the "
            "local user; listen on 127.0.0.1, give a JWT key, or add --allow-insecure-remote"
        )
    print(
        f"apphosting {command}: WARNING: NO AUTHENTICATION on {args.listen}: anyone who can reach this "
        "address acts as the local user (--insecure-no-auth --allow-insecure-remote)",
        file=sys.stderr,
        flush=True,
    )
    return None


def _port_taken(listen: str) -> str | None:
    """Why the API cannot have its port, when another process listens there; None when it looks free."""
    if listen.startswith(("unix:", "unix-abstract:")):
        return None
    host, _, port_text = listen.rpartition(":")
    try:
        port = int(port_text)
        addresses = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (ValueError, OSError):
        return None  # gRPC says what is wrong with the address itself
    if port == 0:
        return None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            # As gRPC binds: a port in TIME_WAIT is free. Without SO_REUSEPORT, so that another server's
            # listening socket, even one that set it, makes this bind fail.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return f"cannot listen on {listen}: another process already serves that port"
    return None


async def _database_unreachable(url: str) -> str | None:
    """Why the database at `url` cannot be used, in one line; None when a connection opens."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import DBAPIError, SQLAlchemyError

    from apphosting import db

    shown = make_url(url).render_as_string(hide_password=True)
    try:
        engine = db.make_engine(url)
    except (SQLAlchemyError, ValueError) as exc:
        return f"cannot use the database URL {shown}: {exc}"
    try:
        async with engine.connect():
            return None
    except (OSError, SQLAlchemyError) as exc:
        cause = exc.orig if isinstance(exc, DBAPIError) else exc
        reason = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        return f"cannot reach the database {shown}: {reason}"
    finally:
        await engine.dispose()


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _at_least(kind: Callable[[str], float], low: float, *, above: bool = False) -> Callable[[str], float]:
    """A flag value parser: a number of `kind` that is at least `low` (with above, more than it)."""

    def parse(text: str) -> float:
        value = kind(text)
        if value < low or (above and value == low):
            raise argparse.ArgumentTypeError(f"must be {'more than' if above else 'at least'} {low:g}, got {text}")
        return value

    return parse


_seconds = _at_least(float, 0)
_positive_seconds = _at_least(float, 0, above=True)
_count = _at_least(int, 0)


def _add_provisioner_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--simulate-delay", type=_seconds, default=0.5, help="seconds each simulated step takes (default 0.5)"
    )
    parser.add_argument(
        "--report-window",
        type=_seconds,
        default=DEFAULT_REPORT_WINDOW,
        metavar="SECONDS",
        help="seconds a done step's event waits for the next step, so that steps done in quick succession "
        f"cost one event; 0 reports every step on its own (default {DEFAULT_REPORT_WINDOW:g})",
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
    parser.add_argument(
        "--simulate-namespace",
        action="append",
        default=[],
        metavar="NAME",
        help="a namespace that exists on every simulated location, for AdoptDeployment (repeatable)",
    )


DEFAULT_REST_LISTEN = "127.0.0.1:8080"

_USER_EPILOG = (
    "user commands (apphosting COMMAND --help): deploy, get, list, watch, events, update, scale, stop, start, "
    "rollback, promote, adopt, delete, retry, releases, completion. They reach the API at --addr or "
    "APPHOSTING_ADDR with APPHOSTING_TOKEN or APPHOSTING_TOKEN_FILE. "
)


# The first words build_parser's subcommands take: a server process starts without the user commands' app.
SERVER_COMMANDS = frozenset({"api", "scheduler", "provisioner", "dev", "updater", "rest", "secrets", "migrate"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apphosting", description=__doc__, epilog=_USER_EPILOG + EXIT_CODES)
    commands = parser.add_subparsers(dest="command", required=True)

    api = commands.add_parser("api", help="run the gRPC DeploymentService")
    api.add_argument("--listen", default=DEFAULT_LISTEN, help=f"address to serve on (default {DEFAULT_LISTEN})")
    _add_common(api)
    _add_api_security(api)
    _add_registry_options(api)
    _add_secret_key_file(api, help_extra="; without one, only secret_ref entries are accepted")

    scheduler = commands.add_parser("scheduler", help="run the scheduler (placement of deployments)")
    _add_common(scheduler)

    provisioner = commands.add_parser("provisioner", help="run a provisioner worker")
    _add_common(provisioner, database=False)
    _add_provisioner_options(provisioner)
    _add_secret_key_file(provisioner, help_extra="; needed to deliver secret values to a kubernetes location")
    provisioner.add_argument(
        "--location",
        action="append",
        default=[],
        dest="location_ids",
        help="serve this location id (repeatable; default: every location)",
    )

    dev = commands.add_parser(
        "dev",
        help="run everything on this machine: nats-server, the API, the scheduler, a provisioner and the image updater",
    )
    dev.add_argument("--listen", default=DEFAULT_LISTEN, help=f"API address (default {DEFAULT_LISTEN})")
    dev.add_argument("--data-dir", default=".apphosting", help="where the database and NATS keep their files")
    dev.add_argument("--locations", default=None, help="locations YAML file (default: the sample locations)")
    dev.add_argument("--log-level", default="WARNING")
    _add_log_format(dev, default="console")
    dev.add_argument(
        "--nats-sync-interval",
        default=None,
        help="how often JetStream fsyncs: 'always' (every write, slower) or a duration like 10s "
        "(default: the server's 2m; see docs/design.md, Durability)",
    )
    dev.add_argument(
        "--rest-listen",
        default=DEFAULT_REST_LISTEN,
        help=f"address of the REST gateway (default {DEFAULT_REST_LISTEN}); 'off' runs none",
    )
    _add_provisioner_options(dev)
    _add_api_security(dev, dev=True)
    _add_registry_options(dev)
    dev.add_argument(
        "--updater-interval",
        type=_at_least(float, 0.0, above=True),
        default=300.0,
        metavar="SECONDS",
        help="how often the image updater reads each repository in use (default 300)",
    )
    _add_secret_key_file(dev, help_extra="; default in dev: DATA_DIR/secret-keys.json, made on first use")
    from apphosting.metrics import DEV_METRICS_LISTEN

    _add_metrics(dev, DEV_METRICS_LISTEN)

    updater = commands.add_parser(
        "updater", help="run the image updater (polls registries, updates deployments with an image update strategy)"
    )
    updater.add_argument(
        "--api",
        default=os.environ.get("APPHOSTING_ADDR", DEFAULT_LISTEN),
        help=f"the gRPC API's address (default: APPHOSTING_ADDR, else {DEFAULT_LISTEN})",
    )
    updater.add_argument("--api-tls", action="store_true", help="TLS to the gRPC API")
    updater.add_argument("--api-ca", default=None, help="CA bundle (PEM) that signed the API's certificate")
    updater.add_argument(
        "--token-file",
        default=os.environ.get("APPHOSTING_TOKEN_FILE"),
        metavar="PATH",
        help="the updater's service token (a JWT of the API's key whose sub is image-updater), read at every call "
        "so a rotated token is picked up (default: APPHOSTING_TOKEN_FILE)",
    )
    updater.add_argument(
        "--interval",
        type=_at_least(float, 0.0, above=True),
        default=300.0,
        metavar="SECONDS",
        help="seconds between rounds; no repository is read more often (default 300)",
    )
    _add_registry_options(updater)
    updater.add_argument(
        "--locations",
        default=None,
        help="locations YAML file (default: the sample locations); deployments on a location with "
        "image_updater: argocd are left to Argo CD Image Updater",
    )
    updater.add_argument("--log-level", default="INFO")
    _add_log_format(updater)
    _add_metrics(updater)

    rest = commands.add_parser("rest", help="run the REST gateway of the reference contract over the gRPC API")
    rest.add_argument(
        "--listen", default=DEFAULT_REST_LISTEN, help=f"HTTP address to serve on (default {DEFAULT_REST_LISTEN})"
    )
    rest.add_argument(
        "--api",
        default=os.environ.get("APPHOSTING_ADDR", DEFAULT_LISTEN),
        help=f"the gRPC API's address (default: APPHOSTING_ADDR, else {DEFAULT_LISTEN})",
    )
    rest.add_argument("--api-tls", action="store_true", help="TLS to the gRPC API")
    rest.add_argument("--api-ca", default=None, help="CA bundle (PEM) that signed the API's certificate")
    rest.add_argument("--log-level", default="INFO")
    _add_log_format(rest)
    _add_metrics(rest)

    keys = commands.add_parser("secrets", help="key files of secret environment values, and key rotation")
    key_commands = keys.add_subparsers(dest="secrets_command", required=True)
    new_key_file = key_commands.add_parser("new-key-file", help="make a key file with one fresh key")
    new_key_file.add_argument("path")
    add_key = key_commands.add_parser(
        "add-key", help="put a fresh key first in a key file: it seals from now on, the others still open"
    )
    add_key.add_argument("path")
    rewrap = key_commands.add_parser(
        "rewrap",
        help="wrap every stored value's data key again with the key file's first key (the values are not "
        "touched); after it, keys no longer named by any value can be removed",
    )
    rewrap.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    _add_secret_key_file(rewrap)
    for sub in (new_key_file, add_key, rewrap):
        sub.add_argument("--log-level", default="INFO")
        _add_log_format(sub, default="console")

    migrate = commands.add_parser("migrate", help="bring every service's tables up to date and exit")
    migrate.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    migrate.add_argument("--log-level", default="INFO")
    _add_log_format(migrate)
    return parser


def _fail(command: str, message: str, code: int = 1) -> int:
    print(f"apphosting {command}: error: {message}", file=sys.stderr, flush=True)
    return code


def _run_loop(main: Coroutine[Any, Any, str | None]) -> str | None:
    """Runs a server process's main coroutine on uvloop where it is installed (Linux and macOS), else on
    asyncio's own loop: the same coroutine, with the loop's own work (callbacks, sockets, timers) in C."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def _run(
    command: str,
    main: Callable[[asyncio.Event], Awaitable[None]],
    *,
    listen: str | None = None,
    database_url: str | None = None,
) -> int:
    """Runs until SIGINT or SIGTERM, which ask for a graceful stop; a port or database it cannot have is
    one line and exit status 1, not a traceback."""
    if listen is not None and (taken := _port_taken(listen)) is not None:
        return _fail(command, taken)

    async def runner() -> str | None:
        if database_url is not None and (unreachable := await _database_unreachable(database_url)) is not None:
            return unreachable
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        # What the process has loaded by now (its modules, classes and settings) lives as long as it does:
        # frozen, the collector's full passes no longer walk it each time (130,000 objects in the API, a pause
        # of 20-30 ms per pass).
        gc.freeze()
        try:
            await main(stop)
        except CannotStart as refused:
            return str(refused)
        return None

    problem = _run_loop(runner())
    return 0 if problem is None else _fail(command, problem)


def _secrets_command(args: argparse.Namespace) -> int:
    from apphosting import secrets

    command = f"secrets {args.secrets_command}"
    try:
        if args.secrets_command == "new-key-file":
            print(f"key file {args.path} made; key {secrets.new_key_file(args.path)} seals")
            return 0
        if args.secrets_command == "add-key":
            print(f"key {secrets.add_key(args.path)} added first to {args.path}: it seals from now on")
            return 0
        if not args.secret_key_file:
            return _fail(command, "--secret-key-file (or APPHOSTING_SECRET_KEY_FILE) is required", 2)
        ring = secrets.load(args.secret_key_file)
    except secrets.SecretKeyError as failure:
        return _fail(command, str(failure))
    from services.deployments.store import rewrap_secrets

    async def rewrap(_: asyncio.Event) -> None:
        counts = await rewrap_secrets(args.database_url, ring)
        print(
            f"{counts.values} sealed values: {counts.rewrapped} re-wrapped with key {ring.sealing_id} in "
            f"{counts.deployments} deployments and {counts.releases} releases"
        )

    return _run(command, rewrap, database_url=args.database_url)


def _user_command(argv: Sequence[str]) -> bool:
    """Whether the user CLI (Typer) takes this command line: a user command, or a shell asking it for
    completions (Typer's completion calls the program with _APPHOSTING_COMPLETE set)."""
    if "_APPHOSTING_COMPLETE" in os.environ:
        return True
    if not argv or argv[0] in SERVER_COMMANDS:
        return False
    from apphosting_cli.user import COMMANDS

    return argv[0] in COMMANDS


def _run_user_command(argv: Sequence[str]) -> int:
    from apphosting_cli.user import app

    try:
        app(args=list(argv), prog_name="apphosting", standalone_mode=True)
    except SystemExit as exited:
        return exited.code if isinstance(exited.code, int) else (0 if exited.code is None else 1)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if _user_command(argv):
        return _run_user_command(argv)
    args = build_parser().parse_args(argv)
    logs.configure(args.command, level=args.log_level.upper(), fmt=args.log_format)
    tracing.configure(args.command)
    if hasattr(args, "nats_creds"):
        _use_nats_security(args)
        _use_nats_cluster(args)
    if hasattr(args, "insecure_no_auth") and (refused := _check_insecure_remote(args.command, args)) is not None:
        return _fail(args.command, refused, 2)
    if args.command == "api":
        from dataclasses import replace

        from services.deployments.app import serve

        if not (args.insecure_no_auth or args.jwt_secret_file or args.jwt_public_key_file or args.oidc_issuer):
            build_parser().error(
                "api needs --jwt-secret-file, --jwt-public-key-file or --oidc-issuer, "
                "or --insecure-no-auth to serve without authentication (local use only)"
            )
        options = replace(
            _api_options(args),
            database_url=args.database_url,
            nats_url=args.nats_url,
            metrics_listen=args.metrics_listen,
            secret_key_file=args.secret_key_file,
        )
        return _run("api", lambda stop: serve(options, stop), listen=args.listen, database_url=args.database_url)
    if args.command == "scheduler":
        from scheduler.service import SchedulerOptions
        from scheduler.service import serve as serve_scheduler

        scheduler_options = SchedulerOptions(
            nats_url=args.nats_url,
            database_url=args.database_url,
            locations_file=args.locations,
            metrics_listen=args.metrics_listen,
        )
        return _run("scheduler", lambda stop: serve_scheduler(scheduler_options, stop), database_url=args.database_url)
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
            simulate_namespaces=tuple(args.simulate_namespace),
            report_window=args.report_window,
            metrics_listen=args.metrics_listen,
            secret_key_file=args.secret_key_file,
        )
        return _run("provisioner", lambda stop: serve_provisioner(provisioner_options, stop))
    if args.command == "dev":
        from apphosting_cli.dev import DevOptions
        from apphosting_cli.dev import serve as serve_dev

        dev_options = DevOptions(
            data_dir=os.path.abspath(args.data_dir),
            locations_file=args.locations,
            simulate_delay=args.simulate_delay,
            simulate_failure_rate=args.simulate_failure_rate,
            simulate_state=args.simulate_state,
            simulate_namespaces=tuple(args.simulate_namespace),
            report_window=args.report_window,
            nats_sync_interval=args.nats_sync_interval,
            api=_api_options(args),
            rest_listen=None if args.rest_listen == "off" else args.rest_listen,
            metrics_listen=None if args.metrics_listen == "off" else args.metrics_listen,
            updater_interval=args.updater_interval,
            secret_key_file=args.secret_key_file,
        )
        return _run("dev", lambda stop: serve_dev(dev_options, stop), listen=args.listen)
    if args.command == "rest":
        from apphosting_cli.rest import RestOptions
        from apphosting_cli.rest import serve as serve_rest
        from apphosting_client import ClientConfig

        rest_options = RestOptions(
            listen=args.listen,
            client=ClientConfig(address=args.api, tls=args.api_tls, ca_file=args.api_ca),
            metrics_listen=args.metrics_listen,
        )
        return _run("rest", lambda stop: serve_rest(rest_options, stop), listen=args.listen)
    if args.command == "updater":
        from apphosting_client import ClientConfig
        from updater.service import UpdaterOptions
        from updater.service import serve as serve_updater

        updater_options = UpdaterOptions(
            client=ClientConfig(address=args.api, tls=args.api_tls, ca_file=args.api_ca, token_file=args.token_file),
            interval=args.interval,
            registries=_registry_access(args),
            metrics_listen=args.metrics_listen,
            locations_file=args.locations,
        )
        return _run("updater", lambda stop: serve_updater(updater_options, stop))
    if args.command == "secrets":
        return _secrets_command(args)
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

        return _run("migrate", migrate, database_url=args.database_url)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
