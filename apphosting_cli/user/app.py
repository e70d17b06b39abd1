"""The user commands of `apphosting` (deploy, get, list, watch, update, ...): a Typer app over the client."""

import asyncio
import functools
import inspect
import json
import sys
from collections.abc import Awaitable, Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import grpc
import typer
import yaml
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.markup import escape

from apphosting.v1 import deployments_pb2 as pb
from apphosting_cli.exits import EXIT_CODES
from apphosting_cli.user import output
from apphosting_cli.user.errors import exit_code, read_error
from apphosting_cli.user.progress import (
    Exit,
    Goal,
    is_gone,
    reaches_running,
    reaches_stopped,
    rolls_out,
    show_outcome,
    wait,
)
from apphosting_client import AsyncClient, ClientConfig

app = typer.Typer(
    name="apphosting",
    help="Deploy and operate apps on App Hosting. Connection: --addr/--token/--token-file/--tls/--ca or "
    "APPHOSTING_ADDR, APPHOSTING_TOKEN, APPHOSTING_TOKEN_FILE (e.g. the dev-token file `apphosting dev` prints), "
    "APPHOSTING_TLS, APPHOSTING_CA.",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

M = TypeVar("M", bound=Message)


class Output(StrEnum):
    table = "table"
    json = "json"
    yaml = "yaml"
    wide = "wide"


class Shell(StrEnum):
    bash = "bash"
    zsh = "zsh"
    fish = "fish"
    powershell = "powershell"


def _console(*, stderr: bool = False) -> Console:
    # Not a terminal (a pipe, a file): no colour, and a table row stays one line for grep and awk.
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 10_000)


_CONNECTION = "Connection"
_WAITING = "Waiting"


def _connection_parameters() -> list[inspect.Parameter]:
    keyword = inspect.Parameter.KEYWORD_ONLY
    options: list[tuple[str, Any]] = [
        (
            "addr",
            Annotated[
                str | None,
                typer.Option("--addr", help="API address host:port (env APPHOSTING_ADDR)", rich_help_panel=_CONNECTION),
            ],
        ),
        (
            "token",
            Annotated[
                str | None,
                typer.Option("--token", help="bearer token (env APPHOSTING_TOKEN)", rich_help_panel=_CONNECTION),
            ],
        ),
        (
            "token_file",
            Annotated[
                Path | None,
                typer.Option(
                    "--token-file",
                    help="file holding the bearer token (env APPHOSTING_TOKEN_FILE)",
                    rich_help_panel=_CONNECTION,
                ),
            ],
        ),
        (
            "tls",
            Annotated[
                bool | None,
                typer.Option("--tls/--no-tls", help="TLS to the API (env APPHOSTING_TLS)", rich_help_panel=_CONNECTION),
            ],
        ),
        (
            "ca",
            Annotated[
                Path | None,
                typer.Option(
                    "--ca", help="CA bundle (PEM) of the API (env APPHOSTING_CA)", rich_help_panel=_CONNECTION
                ),
            ],
        ),
    ]
    return [inspect.Parameter(name, keyword, default=None, annotation=kind) for name, kind in options]


_CONNECTION_PARAMETERS = _connection_parameters()


def _config(
    addr: str | None, token: str | None, token_file: Path | None, tls: bool | None, ca: Path | None
) -> ClientConfig:
    if token is None and token_file is not None:
        token = token_file.read_text(encoding="utf-8").strip()
    return ClientConfig.from_env(address=addr, token=token, tls=tls, ca_file=str(ca) if ca else None)


def command(
    name: str, help_text: str, *, group: typer.Typer | None = None
) -> Callable[[Callable[..., Awaitable[int]]], Callable[..., Awaitable[int]]]:
    """Registers an async command taking `client` (made from the connection options, which every command
    gets) and returning its exit code; a refused call prints its violated fields instead of a traceback."""

    def register(body: Callable[..., Awaitable[int]]) -> Callable[..., Awaitable[int]]:
        signature = inspect.signature(body)
        own = [p for p in signature.parameters.values() if p.name != "client"]

        @functools.wraps(body)
        def run(**values: Any) -> None:
            connection = {p.name: values.pop(p.name) for p in _CONNECTION_PARAMETERS}
            errors = _console(stderr=True)
            try:
                config = _config(**connection)
            except OSError as exc:
                errors.print(f"[bold red]error:[/bold red] cannot read the token: {escape(str(exc))}")
                raise typer.Exit(1) from None

            async def call() -> int:
                async with AsyncClient(config) as client:
                    return await body(client=client, **values)

            try:
                code = asyncio.run(call())
            except grpc.aio.AioRpcError as error:
                refused = read_error(error)
                message = f"{refused.code.name}: {refused.message}"
                output.print_violations(errors, message, [(v.field, v.description) for v in refused.violations])
                code = exit_code(refused)
            except UsageError as error:
                errors.print(f"[bold red]error:[/bold red] {escape(str(error))}")
                code = Exit.INVALID
            except KeyboardInterrupt:
                code = 130
            raise typer.Exit(int(code))

        run.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=own + _CONNECTION_PARAMETERS, return_annotation=None
        )
        run.__annotations__ = {
            **{k: v for k, v in body.__annotations__.items() if k not in ("client", "return")},
            **{p.name: p.annotation for p in _CONNECTION_PARAMETERS},
        }
        (group or app).command(name, help=help_text, epilog=EXIT_CODES)(run)
        return body

    return register


class UsageError(ValueError):
    """Input the command itself refuses before calling the API (a bad file, a malformed K=V)."""


# The options shared by the long operations.
WaitOption = Annotated[
    bool,
    typer.Option("--wait", "-w", help="watch it live until it ends; the exit code says how", rich_help_panel=_WAITING),
]
TimeoutOption = Annotated[
    float | None,
    typer.Option("--timeout", help="with --wait: give up after this many seconds (exit 3)", rich_help_panel=_WAITING),
]
OutputOption = Annotated[Output, typer.Option("--output", "-o", help="table, json, yaml or wide")]
ReasonOption = Annotated[str, typer.Option("--reason", help="why, kept with the release")]
EtagOption = Annotated[str, typer.Option("--etag", help="refuse if the deployment changed since this etag")]
ValidateOption = Annotated[bool, typer.Option("--validate-only", help="check it and explain, change nothing")]
EnvOption = Annotated[list[str] | None, typer.Option("--env", "-e", help="K=V environment variable (repeatable)")]
SecretEnvOption = Annotated[
    list[str] | None,
    typer.Option(
        "--secret-env",
        help="secret environment value, never shown again (repeatable): NAME@FILE reads it from a file, "
        "NAME@- from stdin, NAME=VALUE from the command line (then it is in your shell's history)",
    ),
]
SecretRefOption = Annotated[
    list[str] | None,
    typer.Option("--secret-ref", help="NAME=SECRET/KEY: the value of KEY of an existing Secret in the app's namespace"),
]


def _secret_entries(values: list[str] | None, refs: list[str] | None) -> list[dict[str, Any]]:
    """--secret-env and --secret-ref as SecretEnvironmentVariable entries (JSON)."""
    entries: list[dict[str, Any]] = []
    read_stdin = False
    for item in values or ():
        at, eq = item.find("@"), item.find("=")
        if at > 0 and (eq < 0 or at < eq):
            name, source = item[:at], item[at + 1 :]
            if source == "-":
                if read_stdin:
                    raise UsageError("--secret-env: only one value can come from stdin (NAME@-)")
                read_stdin = True
                value = sys.stdin.read()
            else:
                try:
                    value = Path(source).read_text(encoding="utf-8")
                except OSError as exc:
                    raise UsageError(f"--secret-env {name}: cannot read {source}: {exc.strerror}") from None
            # A file or a pipe ends with one newline the value does not mean.
            value = value[:-1] if value.endswith("\n") else value
        elif eq > 0:
            name, value = item[:eq], item[eq + 1 :]
        else:
            raise UsageError(
                f"--secret-env takes NAME=VALUE, NAME@FILE or NAME@-, got a value without either for {item[:40]!r}"
            )
        entries.append({"name": name, "value": value})
    for item in refs or ():
        name, sep, target = item.partition("=")
        secret, slash, key = target.partition("/")
        if not (name and sep and secret and slash and key):
            raise UsageError(f"--secret-ref takes NAME=SECRET/KEY, got {item!r}")
        entries.append({"name": name, "secret_ref": {"name": secret, "key": key}})
    return entries


def _pairs(items: list[str] | None, flag: str) -> list[tuple[str, str]]:
    pairs = []
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} takes KEY=VALUE, got {item!r}")
        pairs.append((key, value))
    return pairs


def _value(text: str) -> Any:
    """A --set or --config value: JSON when it parses (numbers, lists, objects), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _print_deployment(deployment: pb.Deployment, fmt: Output) -> None:
    console = _console()
    if fmt in (Output.json, Output.yaml):
        console.print(output.dump(deployment, fmt.value), markup=False, highlight=False, soft_wrap=True)
    else:
        console.print(output.deployment_table(deployment))


async def _finish(
    client: AsyncClient, answer: pb.Deployment, goal: Goal, *, waiting: bool, deadline: float | None, fmt: Output
) -> int:
    """Prints what the API answered, and with --wait, watches it to the end."""
    console = _console()
    if not waiting and fmt in (Output.json, Output.yaml):
        _print_deployment(answer, fmt)
        return Exit.OK
    state = output.status_name(answer.status) + (" (reconciling)" if answer.reconciling else "")
    console.print(
        f"{escape(answer.name)} {answer.id}: {state}"
        + (f", {escape(answer.operation)}" if answer.operation else "")
        + (f", release {answer.release}" if answer.release else ""),
        highlight=False,
    )
    if not waiting:
        return Exit.OK
    outcome = await wait(client, answer.id, goal, console=console, deadline=deadline)
    show_outcome(console, answer.name or answer.id, outcome)
    return outcome.code


def _load_file(path: Path) -> dict[str, Any]:
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    try:
        body = yaml.safe_load(text)  # YAML is a superset of JSON: one reader for both
    except yaml.YAMLError as exc:
        raise UsageError(f"{path} is neither JSON nor YAML: {exc}") from None
    if not isinstance(body, dict):
        raise UsageError(f"{path} must hold one object (a CreateAppHostingDeploymentRequest)")
    return body


def _parse(body: dict[str, Any], message: M, what: str) -> M:
    try:
        return json_format.ParseDict(body, message)
    except json_format.ParseError as exc:
        raise UsageError(f"{what}: {exc}") from None


@command("deploy", "Create a deployment from flags or -f FILE (JSON or YAML, the reference's request body).")
async def deploy(
    client: AsyncClient,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="request body: JSON or YAML, - for stdin")] = None,
    name: Annotated[str | None, typer.Option("--name", "-n", help="deployment_name")] = None,
    region: Annotated[str | None, typer.Option("--region", help="geographic_region (e.g. eu)")] = None,
    image: Annotated[str | None, typer.Option("--image", help="docker_image")] = None,
    app_type: Annotated[str | None, typer.Option("--app-type", help="web_app, api, container, helm, ...")] = None,
    cpu: Annotated[float | None, typer.Option("--cpu", help="cpu_request in cores")] = None,
    memory_mb: Annotated[int | None, typer.Option("--memory-mb", help="memory_request_mb")] = None,
    replicas: Annotated[int | None, typer.Option("--replicas")] = None,
    port: Annotated[int | None, typer.Option("--port", help="container_port")] = None,
    storage_gb: Annotated[int | None, typer.Option("--storage-gb", help="storage_size_gb")] = None,
    env: EnvOption = None,
    secret_env: SecretEnvOption = None,
    secret_ref: SecretRefOption = None,
    config: Annotated[list[str] | None, typer.Option("--config", help="K=V config entry (repeatable)")] = None,
    set_fields: Annotated[
        list[str] | None, typer.Option("--set", help="any request field=value (JSON values parse)")
    ] = None,
    validate_only: ValidateOption = False,
    wait_: WaitOption = False,
    deadline: TimeoutOption = None,
    fmt: OutputOption = Output.table,
) -> int:
    body = _load_file(file) if file is not None else {}
    flags: dict[str, Any] = {
        "deployment_name": name,
        "geographic_region": region,
        "docker_image": image,
        "app_type": app_type,
        "cpu_request": cpu,
        "memory_request_mb": memory_mb,
        "replicas": replicas,
        "container_port": port,
        "storage_size_gb": storage_gb,
    }
    body.update({key: value for key, value in flags.items() if value is not None})
    if env:
        body["environment_variables"] = [f"{k}={v}" for k, v in _pairs(env, "--env")]
    if secret_env or secret_ref:
        body["secret_environment_variables"] = [
            *body.get("secret_environment_variables", []),
            *_secret_entries(secret_env, secret_ref),
        ]
    if config:
        body["config"] = {**body.get("config", {}), **{k: _value(v) for k, v in _pairs(config, "--config")}}
    body.update({k: _value(v) for k, v in _pairs(set_fields, "--set")})
    if "app_type" not in body and "docker_image" in body and not {"helm_repo_url", "helm_chart_name"} & body.keys():
        # The contract's default app_type is helm; an image and no chart means a container, as a user means it.
        body["app_type"] = "container"
    request = _parse(body, pb.CreateAppHostingDeploymentRequest(), "the request")
    request.validate_only = validate_only
    answer = await client.create(request)
    if validate_only:
        return _previewed(answer, fmt)
    return await _finish(client, answer, reaches_running, waiting=wait_, deadline=deadline, fmt=fmt)


def _previewed(answer: pb.Deployment, fmt: Output) -> int:
    """A validate_only answer: what the operation would make, written nowhere."""
    _print_deployment(answer, fmt if fmt != Output.table else Output.yaml)
    return Exit.OK


@command("get", "Show one deployment.")
async def get(
    client: AsyncClient,
    deployment_id: Annotated[str, typer.Argument(help="deployment id")],
    fmt: OutputOption = Output.table,
) -> int:
    _print_deployment(await client.get(deployment_id), fmt)
    return Exit.OK


@command("list", "List your deployments, newest first.")
async def list_(
    client: AsyncClient,
    fmt: OutputOption = Output.table,
    status: Annotated[list[str] | None, typer.Option("--status", help="only this status (repeatable)")] = None,
    region: Annotated[str, typer.Option("--region", help="only this geographic_region")] = "",
    show_deleted: Annotated[
        bool, typer.Option("--show-deleted", help="also deployments already torn down, until they are purged")
    ] = False,
) -> int:
    statuses = []
    for name in status or ():
        key = "DEPLOYMENT_STATUS_" + name.upper()
        if key not in pb.DeploymentStatus.keys():  # noqa: SIM118 (an enum wrapper, not a dict)
            raise UsageError(f"--status {name}: not a status")
        statuses.append(pb.DeploymentStatus.Value(key))
    deployments = [
        d async for d in client.list_all(statuses=statuses, geographic_region=region, show_deleted=show_deleted)
    ]
    console = _console()
    if fmt in (Output.json, Output.yaml):
        console.print(output.dump(deployments, fmt.value), markup=False, highlight=False, soft_wrap=True)
    else:
        console.print(output.deployments_table(deployments, wide=fmt == Output.wide))
    return Exit.OK


@command("watch", "Follow a deployment's changes live until its last one (Ctrl-C stops).")
async def watch(
    client: AsyncClient,
    deployment_id: Annotated[str, typer.Argument(help="deployment id")],
    since: Annotated[int, typer.Option("--since", help="changes after this revision (0: current state first)")] = 0,
) -> int:
    console = _console()
    async for item in client.watch(deployment_id, since_revision=since):
        console.print(escape(output.event_line(item)), highlight=False, soft_wrap=True)
    return Exit.OK


@command("events", "Print the event log of a deployment, oldest first.")
async def events(
    client: AsyncClient,
    deployment_id: Annotated[str, typer.Argument(help="deployment id")],
    follow: Annotated[bool, typer.Option("--follow", help="keep printing new events")] = False,
) -> int:
    console = _console()
    current = await client.get(deployment_id)
    created = f"{output._time(current.created_at):19}" if current.HasField("created_at") else ""
    console.print(f"#{1:<4} {created} {'pending':<14} {'':<14} created", highlight=False, markup=False)
    if current.revision <= 1 and not follow:
        return Exit.OK
    async for item in client.watch(deployment_id, since_revision=1):
        console.print(escape(output.event_line(item)), highlight=False, soft_wrap=True)
        if not follow and item.deployment.revision >= current.revision:
            break
    return Exit.OK


async def _current(client: AsyncClient, deployment_id: str) -> pb.Deployment:
    return await client.get(deployment_id)


@command("update", "Change a deployment's image, size, env or any updatable field; rolls out a new release.")
async def update(
    client: AsyncClient,
    deployment_id: Annotated[str, typer.Argument(help="deployment id")],
    image: Annotated[str | None, typer.Option("--image", help="docker_image")] = None,
    replicas: Annotated[int | None, typer.Option("--replicas")] = None,
    cpu: Annotated[float | None, typer.Option("--cpu", help="cpu_request in cores")] = None,
    memory_mb: Annotated[int | None, typer.Option("--memory-mb", help="memory_request_mb")] = None,
    env: Annotated[
        list[str] | None,
        typer.Option("--env", "-e", help="K=V: sets K, keeping the other variables (repeatable)"),
    ] = None,
    secret_env: SecretEnvOption = None,
    secret_ref: SecretRefOption = None,
    set_fields: Annotated[
        list[str] | None, typer.Option("--set", help="field=value of any updatable field (JSON values parse)")
    ] = None,
    reason: ReasonOption = "",
    etag: EtagOption = "",
    validate_only: ValidateOption = False,
    wait_: WaitOption = False,
    deadline: TimeoutOption = None,
    fmt: OutputOption = Output.table,
) -> int:
    fields: dict[str, Any] = {
        key: value
        for key, value in {
            "docker_image": image,
            "replicas": replicas,
            "cpu_request": cpu,
            "memory_request_mb": memory_mb,
        }.items()
        if value is not None
    }
    if env:
        # The mask replaces the whole list: merge the given variables into the current ones.
        given = dict(_pairs(env, "--env"))
        current = await _current(client, deployment_id)
        kept = [e for e in current.environment_variables if e.partition("=")[0] not in given]
        fields["environment_variables"] = kept + [f"{k}={v}" for k, v in given.items()]
    if secret_env or secret_ref:
        # The mask replaces the whole set: the others are named alone, which keeps their stored values.
        entries = _secret_entries(secret_env, secret_ref)
        named = {entry["name"] for entry in entries}
        current = await _current(client, deployment_id)
        kept_secrets = [{"name": e.name} for e in current.secret_environment_variables if e.name not in named]
        fields["secret_environment_variables"] = kept_secrets + entries
    fields.update({k: _value(v) for k, v in _pairs(set_fields, "--set")})
    if not fields:
        raise UsageError(
            "nothing to update: give --image, --replicas, --cpu, --memory-mb, --env, --secret-env, "
            "--secret-ref or --set"
        )
    deployment = _parse({**fields, "id": deployment_id}, pb.Deployment(), "the update")
    answer = await client.update(deployment, list(fields), etag=etag, validate_only=validate_only, reason=reason)
    if validate_only:
        _print_deployment(answer, fmt)
        return Exit.OK
    return await _finish(client, answer, rolls_out(answer.release), waiting=wait_, deadline=deadline, fmt=fmt)


@command("scale", "Set the number of replicas.")
async def scale(
    client: AsyncClient,
    deployment_id: Annotated[str, typer.Argument(help="deployment id")],
    replicas: Annotated[int, typer.Argument(help="replicas")],
    reason: ReasonOption = "",
    etag: EtagOption = "",
    validate_only: ValidateOption = False,
    wait_: WaitOption = False,
    deadline: TimeoutOption = None,
    fmt: OutputOption = Output.table,
) -> int:
    answer = await client.scale(deployment_id, replicas, etag=etag, reason=reason, validate_only=validate_only)
    if validate_only:
        return _previewed(answer, fmt)
    return await _finish(client, answer, rolls_out(answer.release), waiting=wait_, deadline=deadline, fmt=fmt)


@command("stop", "Scale the app to zero and put its vCluster to sleep (volumes and config kept).")
async def stop(
    client: AsyncClient,
    deployment_id: Annotated[str, typer.Argument(help="deployment id")],
    reason: ReasonOption = "",
    etag: EtagOption = "",
    validate_only: ValidateOption = False,
    wait_: WaitOption = False,
    deadline: TimeoutOption = None,
    fmt: OutputOption = Output.table,
) -> int:
    answer = await client.stop(deployment_id, etag=etag, reason=reason, validate_only=validate_only)
    if validate_only:
        return _previewed(answer, fmt)
    return await _finish(client, answer, reaches_stopped, waiting=wait_, deadline=deadline, fmt=fmt)


@command("start", "Wake a stopped deployment and scale its app back up.")
async def start(
    client: AsyncClient,
    deployment_id: Annotated[str, typer.Argument(help="deployment id")],
    reason: ReasonOption = "",
    etag: EtagOption = "",
    validate_only: ValidateOption = False,
    wait_: WaitOption = False,
    deadline: TimeoutOption = None,
    fmt: OutputOption = Output.table,
) -> int:
    answer = await client.start(deployment_id, etag=etag, reason=reason, validate_only=validate_only)
    if validate_only:
        return _previewed(answer, fmt)
    return await _finish(client, answer, reaches_running, waiting=wait_, deadline=deadline, fmt=fmt)


@command("rollback", "Re-apply an earlier release (default: the last healthy one before the current).")
async def rollback(
    client: AsyncClient,
    deployment_id: Annotated[str, typer.Argument(help="deployment id")],
    release: Annotated[int, typer.Option("--release", help="release number (see `releases`)")] = 0,
    reason: ReasonOption = "",
    etag: EtagOption = "",
    validate_only: ValidateOption = False,
    wait_: WaitOption = False,
    deadline: TimeoutOption = None,
    fmt: OutputOption = Output.table,
) -> int:
    answer = await client.rollback(deployment_id, release, etag=etag, reason=reason, validate_only=validate_only)
    if validate_only:
        return _previewed(answer, fmt)
    return await _finish(client, answer, rolls_out(answer.release), waiting=wait_, deadline=deadline, fmt=fmt)


@command("promote", "Copy a deployment (with overrides) to a new one on another location; --wait follows the copy.")
async def promote(
    client: AsyncClient,
    deployment_id: Annotated[str, typer.Argument(help="deployment id")],
    to: Annotated[str, typer.Option("--to", help="target location id")] = "",
    region: Annotated[str, typer.Option("--region", help="target geographic_region (any location there)")] = "",
    name: Annotated[str, typer.Option("--name", help="the copy's name (default <name>-copy)")] = "",
    delete_source: Annotated[
        bool, typer.Option("--delete-source", help="a migration: the source goes once the copy runs")
    ] = False,
    image: Annotated[str | None, typer.Option("--image", help="override docker_image")] = None,
    replicas: Annotated[int | None, typer.Option("--replicas", help="override replicas")] = None,
    cpu: Annotated[float | None, typer.Option("--cpu", help="override cpu_request")] = None,
    memory_mb: Annotated[int | None, typer.Option("--memory-mb", help="override memory_request_mb")] = None,
    env: EnvOption = None,
    etag: EtagOption = "",
    validate_only: ValidateOption = False,
    wait_: WaitOption = False,
    deadline: TimeoutOption = None,
    fmt: OutputOption = Output.table,
) -> int:
    overrides = pb.PromoteOverrides(
        docker_image=image,
        replicas=replicas,
        cpu_request=cpu,
        memory_request_mb=memory_mb,
        environment_variables=[f"{k}={v}" for k, v in _pairs(env, "--env")],
    )
    request = pb.PromoteDeploymentRequest(
        id=deployment_id,
        target_location=to,
        target_geographic_region=region,
        new_name=name,
        delete_source=delete_source,
        overrides=overrides,
        etag=etag,
        validate_only=validate_only,
    )
    answer = await client.promote(request)
    if validate_only or (not wait_ and fmt in (Output.json, Output.yaml)):
        console = _console()
        console.print(output.dump(answer, "yaml" if fmt == Output.table else fmt.value), markup=False, soft_wrap=True)
        return Exit.OK
    console = _console()
    console.print(
        f"{escape(answer.source.name)} {answer.source.id}: {output.status_name(answer.source.status)}", highlight=False
    )
    return await _finish(client, answer.target, reaches_running, waiting=wait_, deadline=deadline, fmt=fmt)


@command("adopt", "Take an existing namespace on a location, with its workloads, under management.")
async def adopt(
    client: AsyncClient,
    location: Annotated[str, typer.Option("--location", help="location id the namespace is on")],
    namespace: Annotated[str, typer.Option("--namespace", help="the namespace to adopt")],
    name: Annotated[str, typer.Option("--name", help="deployment_name (default: the namespace)")] = "",
    app_type: Annotated[str | None, typer.Option("--app-type")] = None,
    image: Annotated[str | None, typer.Option("--image", help="docker_image")] = None,
    replicas: Annotated[int | None, typer.Option("--replicas")] = None,
    cpu: Annotated[float | None, typer.Option("--cpu", help="cpu_request in cores")] = None,
    memory_mb: Annotated[int | None, typer.Option("--memory-mb", help="memory_request_mb")] = None,
    port: Annotated[int | None, typer.Option("--port", help="container_port")] = None,
    storage_gb: Annotated[int | None, typer.Option("--storage-gb", help="storage_size_gb")] = None,
    validate_only: ValidateOption = False,
    wait_: WaitOption = False,
    deadline: TimeoutOption = None,
    fmt: OutputOption = Output.table,
) -> int:
    request = pb.AdoptDeploymentRequest(
        location=location,
        source_namespace=namespace,
        deployment_name=name,
        app_type=app_type,
        docker_image=image,
        replicas=replicas,
        cpu_request=cpu,
        memory_request_mb=memory_mb,
        container_port=port,
        storage_size_gb=storage_gb,
        validate_only=validate_only,
    )
    answer = await client.adopt(request)
    if validate_only:
        _print_deployment(answer, fmt)
        return Exit.OK
    return await _finish(client, answer, reaches_running, waiting=wait_, deadline=deadline, fmt=fmt)


@command("delete", "Tear a deployment down.")
async def delete(
    client: AsyncClient,
    deployment_id: Annotated[str, typer.Argument(help="deployment id")],
    force: Annotated[bool, typer.Option("--force", help="even while an operation is in flight")] = False,
    etag: EtagOption = "",
    wait_: WaitOption = False,
    deadline: TimeoutOption = None,
    fmt: OutputOption = Output.table,
) -> int:
    answer = await client.delete(deployment_id, etag=etag, force=force)
    return await _finish(client, answer, is_gone, waiting=wait_, deadline=deadline, fmt=fmt)


@command("retry", "Start a failed or error deployment again from placement.")
async def retry(
    client: AsyncClient,
    deployment_id: Annotated[str, typer.Argument(help="deployment id")],
    etag: EtagOption = "",
    wait_: WaitOption = False,
    deadline: TimeoutOption = None,
    fmt: OutputOption = Output.table,
) -> int:
    answer = await client.retry(deployment_id, etag=etag)
    return await _finish(client, answer, reaches_running, waiting=wait_, deadline=deadline, fmt=fmt)


@command("releases", "List a deployment's releases, newest first.")
async def releases(
    client: AsyncClient,
    deployment_id: Annotated[str, typer.Argument(help="deployment id")],
    fmt: OutputOption = Output.table,
) -> int:
    found: list[pb.Release] = []
    token = ""
    while True:
        page = await client.releases(deployment_id, page_token=token)
        found.extend(page.releases)
        token = page.next_page_token
        if not token:
            break
    console = _console()
    if fmt in (Output.json, Output.yaml):
        console.print(output.dump(found, fmt.value), markup=False, highlight=False, soft_wrap=True)
    else:
        console.print(output.releases_table(found))
    return Exit.OK


@command("preview-image", "Say which tag the image update policy would deploy now, and why; changes nothing.")
async def preview_image(
    client: AsyncClient,
    deployment_id: Annotated[str, typer.Argument(help="deployment id")],
    fmt: OutputOption = Output.table,
) -> int:
    answer = await client.preview_image_update(deployment_id)
    console = _console()
    if fmt in (Output.json, Output.yaml):
        console.print(output.dump(answer, fmt.value), markup=False, highlight=False, soft_wrap=True)
    else:
        summary, candidates = output.image_preview(answer)
        console.print(summary)
        console.print()
        console.print(candidates)
    return Exit.OK


api_keys_app = typer.Typer(
    help="Make, list and revoke your API keys: `authorization: Bearer <key>` for scripts and CI. "
    "Only a token (not an API key) may create or revoke keys.",
    no_args_is_help=True,
)
app.add_typer(api_keys_app, name="api-keys")


@command("create", "Make an API key; it is printed this once and never shown again.", group=api_keys_app)
async def api_keys_create(
    client: AsyncClient,
    name: Annotated[str, typer.Argument(help="what the key is for (ci, nightly-deploys)")],
    read_only: Annotated[bool, typer.Option("--read-only", help="it may only get, list and watch")] = False,
    ttl: Annotated[int, typer.Option("--ttl", help="seconds until it expires; 0: never")] = 0,
    fmt: OutputOption = Output.table,
) -> int:
    made = await client.create_api_key(name, read_only=read_only, ttl_seconds=ttl)
    console = _console()
    if fmt in (Output.json, Output.yaml):
        console.print(output.dump(made, fmt.value), markup=False, highlight=False, soft_wrap=True)
        return Exit.OK
    # The key alone on stdout, so `KEY=$(apphosting api-keys create ci)` keeps just it; the rest on stderr.
    notes = _console(stderr=True)
    notes.print(output.api_keys_table([made.api_key]))
    notes.print("The key, shown only now (send it as `authorization: Bearer <key>`):", markup=False)
    console.print(made.key, markup=False, highlight=False, soft_wrap=True)
    return Exit.OK


@command("list", "List your API keys (never their secrets), newest first.", group=api_keys_app)
async def api_keys_list(client: AsyncClient, fmt: OutputOption = Output.table) -> int:
    found = [key async for key in client.list_all_api_keys()]
    console = _console()
    if fmt in (Output.json, Output.yaml):
        console.print(output.dump(found, fmt.value), markup=False, highlight=False, soft_wrap=True)
    else:
        console.print(output.api_keys_table(found))
    return Exit.OK


@command("revoke", "Revoke one of your API keys at once.", group=api_keys_app)
async def api_keys_revoke(
    client: AsyncClient,
    key_id: Annotated[str, typer.Argument(help="the key's id (from `apphosting api-keys list`)")],
    fmt: OutputOption = Output.table,
) -> int:
    revoked = await client.revoke_api_key(key_id)
    console = _console()
    if fmt in (Output.json, Output.yaml):
        console.print(output.dump(revoked, fmt.value), markup=False, highlight=False, soft_wrap=True)
    else:
        console.print(output.api_keys_table([revoked]))
    return Exit.OK


@app.command("completion", help='Print the shell completion script: `eval "$(apphosting completion bash)"`.')
def completion(shell: Annotated[Shell, typer.Argument(help="bash, zsh, fish or powershell")]) -> None:
    from typer._completion_shared import get_completion_script

    typer.echo(get_completion_script(prog_name="apphosting", complete_var="_APPHOSTING_COMPLETE", shell=shell.value))


# Every first word that belongs to this app rather than to the server commands of apphosting_cli.main.
COMMANDS = frozenset(
    {c.name for c in app.registered_commands if c.name}
    | {g.name for g in app.registered_groups if g.name}
    | {"--install-completion", "--show-completion"}
)
