"""How the user CLI shows deployments, releases, events and API keys: Rich tables, JSON, YAML and one-line events."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import yaml
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from apphosting.v1 import api_keys_pb2
from apphosting.v1 import deployments_pb2 as pb

_STATUS_PREFIX = "DEPLOYMENT_STATUS_"
_STATUS_STYLE = {
    "running": "green",
    "stopped": "yellow",
    "failed": "red",
    "error": "red",
    "deleting": "magenta",
}


def status_name(status: pb.DeploymentStatus.ValueType) -> str:
    """`running` for DEPLOYMENT_STATUS_RUNNING: the reference's lowercase value."""
    return pb.DeploymentStatus.Name(status).removeprefix(_STATUS_PREFIX).lower()


def app_type_name(app_type: pb.AppType.ValueType) -> str:
    return pb.AppType.Name(app_type).removeprefix("APP_TYPE_").lower()


def to_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def dump(items: Sequence[Message] | Message, fmt: str) -> str:
    """One message, or a list of them, as JSON or YAML with the proto field names."""
    data: Any = to_dict(items) if isinstance(items, Message) else [to_dict(item) for item in items]
    if fmt == "yaml":
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).rstrip("\n")
    return json.dumps(data, indent=2)


def styled_status(deployment: pb.Deployment) -> str:
    name = status_name(deployment.status)
    if deployment.reconciling:
        name += " (reconciling)"
    style = _STATUS_STYLE.get(status_name(deployment.status))
    return f"[{style}]{name}[/{style}]" if style else name


def _time(value: Any) -> str:
    if not value.seconds and not value.nanos:
        return ""
    when: datetime = value.ToDatetime()
    return when.strftime("%Y-%m-%d %H:%M:%S")


def deployments_table(deployments: Sequence[pb.Deployment], *, wide: bool = False) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    columns = ["ID", "NAME", "STATUS", "PHASE", "REGION", "LOCATION", "RELEASE"]
    if wide:
        columns += ["IMAGE", "REPLICAS", "CPU", "MEMORY_MB", "ENDPOINT", "CREATED"]
    for column in columns:
        table.add_column(column, overflow="fold")
    for d in deployments:
        row = [d.id, d.name, styled_status(d), d.phase, d.geographic_region, d.location_id, str(d.release)]
        if wide:
            row += [
                d.docker_image or d.helm_chart_name,
                str(d.replicas) if d.HasField("replicas") else "",
                f"{d.cpu_request:g}" if d.HasField("cpu_request") else "",
                str(d.memory_request_mb) if d.HasField("memory_request_mb") else "",
                d.endpoint_url,
                _time(d.created_at),
            ]
        table.add_row(*row)
    return table


def deployment_table(d: pb.Deployment) -> Table:
    """One deployment as FIELD  VALUE rows: the fields a person reads first."""
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    rows = [
        ("id", d.id),
        ("name", d.name),
        ("status", styled_status(d)),
        ("phase", d.phase),
        ("operation", d.operation),
        ("region", d.geographic_region),
        ("location", d.location_id),
        ("release", f"{d.release} (healthy: {d.healthy_release})"),
        ("app type", app_type_name(d.app_type)),
        ("image", d.docker_image),
        ("chart", " ".join(x for x in (d.helm_chart_name, d.helm_chart_version) if x)),
        ("replicas", str(d.replicas) if d.HasField("replicas") else ""),
        ("cpu", f"{d.cpu_request:g}" if d.HasField("cpu_request") else ""),
        ("memory MB", str(d.memory_request_mb) if d.HasField("memory_request_mb") else ""),
        ("endpoint", d.endpoint_url),
        ("error", d.error_message),
        ("created", _time(d.created_at)),
        ("updated", _time(d.updated_at)),
    ]
    for name, value in rows:
        if value:
            table.add_row(name, value)
    return table


def releases_table(releases: Sequence[pb.Release]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("RELEASE", "OPERATION", "HEALTHY", "IMAGE", "REPLICAS", "ACTOR", "REASON", "CREATED"):
        table.add_column(column, overflow="fold")
    for r in releases:
        table.add_row(
            str(r.number),
            r.operation + (f" (of {r.rollback_of})" if r.rollback_of else ""),
            "yes" if r.healthy else "no",
            r.spec.docker_image or r.spec.helm_chart_name,
            str(r.spec.replicas) if r.spec.HasField("replicas") else "",
            r.actor,
            r.reason,
            _time(r.create_time),
        )
    return table


def image_preview(answer: pb.PreviewImageUpdateResponse) -> tuple[Table, Table]:
    """What the image update policy would do (a key/value table) and every candidate tag with its verdict."""
    summary = Table(box=None, show_header=False, pad_edge=False)
    summary.add_column(style="bold")
    summary.add_column(overflow="fold")
    current = answer.current_tag + (f"@{answer.current_digest}" if answer.current_digest else "")
    rows = [
        ("repository", answer.repository),
        ("strategy", answer.strategy),
        ("constraint", answer.constraint),
        ("allow tags", answer.allow_tags),
        ("ignore tags", answer.ignore_tags),
        ("current", current),
        ("winner", answer.winner + (f"@{answer.winner_digest}" if answer.winner_digest else "")),
        ("reason", answer.reason),
        ("would update", "yes" if answer.would_update else "no"),
        ("paused", "yes (since a rollback)" if answer.paused else ""),
        ("new image", answer.new_docker_image),
        ("new release", str(answer.new_release) if answer.new_release else ""),
    ]
    for name, value in rows:
        if value:
            summary.add_row(name, escape(value))
    candidates = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("TAG", "VERDICT", "DETAIL", "CREATED", "DIGEST"):
        candidates.add_column(column, overflow="fold")
    for c in answer.candidates:
        verdict = "kept" if c.kept else c.excluded_by
        mark = "[bold green]winner[/bold green]" if c.tag == answer.winner else escape(verdict)
        candidates.add_row(
            escape(c.tag),
            mark,
            escape(c.detail),
            _time(c.created) if c.HasField("created") else "",
            c.digest[:19],
        )
    return summary, candidates


def api_keys_table(keys: Sequence[api_keys_pb2.ApiKey]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("ID", "NAME", "PREFIX", "SCOPE", "CREATED", "EXPIRES", "LAST USED", "REVOKED"):
        table.add_column(column, overflow="fold")
    for key in keys:
        table.add_row(
            key.id,
            escape(key.name),
            key.prefix,
            "read-only" if key.read_only else "full",
            _time(key.create_time),
            _time(key.expire_time) or "never",
            _time(key.last_used_time) or "never",
            _time(key.revoke_time),
        )
    return table


def event_line(item: pb.WatchDeploymentResponse) -> str:
    """One change as a plain line: revision, time, status, phase and message."""
    d = item.deployment
    if not item.HasField("event"):
        state = status_name(d.status) + (" (reconciling)" if d.reconciling else "")
        return f"#{d.revision:<4} {'':19} {state:<14} {d.phase:<14} current state"
    e = item.event
    message = e.message or ""
    if e.simulated and "simulated" not in message:
        message += " (simulated)"
    return f"#{e.revision:<4} {_time(e.time):19} {status_name(e.status):<14} {e.phase:<14} {message}".rstrip()


def print_violations(console: Console, message: str, violations: Sequence[tuple[str, str]]) -> None:
    console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False)
    for name, description in violations:
        console.print(f"  - [bold]{escape(name)}[/bold]: {escape(description)}", highlight=False)
