"""--wait: watches a deployment until an operation ends, showing each step live, and says how it ended."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from rich.console import Console
from rich.markup import escape

from apphosting.v1 import deployments_pb2 as pb
from apphosting_cli.user.output import event_line, status_name
from apphosting_client import AsyncClient

RUNNING = pb.DEPLOYMENT_STATUS_RUNNING
STOPPED = pb.DEPLOYMENT_STATUS_STOPPED
FAILED = pb.DEPLOYMENT_STATUS_FAILED
ERROR = pb.DEPLOYMENT_STATUS_ERROR


class Exit(IntEnum):
    """The exit codes of the user commands (also listed in `apphosting --help`)."""

    OK = 0
    FAILED = 1
    INVALID = 2
    TIMEOUT = 3


@dataclass(frozen=True)
class Outcome:
    code: Exit
    summary: str


# Looks at the deployment after a change: an Outcome when the operation has ended, else None.
Goal = Callable[[pb.Deployment], Outcome | None]


def _failed(d: pb.Deployment) -> Outcome | None:
    if d.status in (FAILED, ERROR):
        return Outcome(Exit.FAILED, f"{status_name(d.status)}: {d.error_message or d.phase}")
    return None


def _running(d: pb.Deployment) -> str:
    return "running" + (f" at {d.endpoint_url}" if d.endpoint_url else "")


def reaches_running(d: pb.Deployment) -> Outcome | None:
    """A create, start, retry, adopt or promote copy: running with nothing left to converge."""
    if (failed := _failed(d)) is not None:
        return failed
    if d.status == RUNNING and not d.reconciling:
        return Outcome(Exit.OK, _running(d))
    return None


def rolls_out(release: int) -> Goal:
    """An update, scale or rollback to `release`: it must become the healthy one; an automatic rollback
    to another release is a failure of the operation even though the deployment runs."""

    def check(d: pb.Deployment) -> Outcome | None:
        if (failed := _failed(d)) is not None:
            return failed
        if d.reconciling:
            return None
        if d.status == STOPPED:
            return Outcome(Exit.OK, f"stopped; release {d.release} rolls out when it starts")
        if d.status != RUNNING:
            return None
        if d.release == release and d.healthy_release >= release:
            return Outcome(Exit.OK, f"release {release} is {_running(d)}")
        if d.release != release:
            return Outcome(Exit.FAILED, f"release {release} did not roll out: {d.error_message or 'replaced'}")
        return None

    return check


def reaches_stopped(d: pb.Deployment) -> Outcome | None:
    if (failed := _failed(d)) is not None:
        return failed
    if d.status == STOPPED and not d.reconciling:
        return Outcome(Exit.OK, "stopped")
    return None


def is_gone(d: pb.Deployment) -> Outcome | None:
    if d.HasField("deleted_at"):
        return Outcome(Exit.OK, "deleted")
    return _failed(d)


async def wait(
    client: AsyncClient, deployment_id: str, goal: Goal, *, console: Console, deadline: float | None
) -> Outcome:
    """Every step of the deployment as it happens (a spinner over the lines on a terminal, plain lines
    otherwise) until `goal` holds, the watch ends, or `deadline` seconds pass."""
    live = console.is_terminal
    status = console.status(f"waiting for {deployment_id}", spinner="dots") if live else None
    if status is not None:
        status.start()
    last: pb.Deployment | None = None
    try:
        async with asyncio.timeout(deadline):
            async for item in client.watch(deployment_id):
                last = item.deployment
                console.print(escape(event_line(item)), highlight=False, soft_wrap=True)
                if status is not None:
                    state = status_name(last.status) + (" (reconciling)" if last.reconciling else "")
                    status.update(f"[bold]{escape(last.name)}[/bold] {state} · {escape(last.phase)}")
                if (outcome := goal(last)) is not None:
                    return outcome
    except TimeoutError:
        where = f" (still {status_name(last.status)}, {last.phase})" if last is not None else ""
        return Outcome(Exit.TIMEOUT, f"timed out after {deadline:g} s{where}")
    finally:
        if status is not None:
            status.stop()
    if last is not None and (outcome := goal(last)) is not None:
        return outcome
    return Outcome(Exit.FAILED, "the watch ended before the operation did")


def show_outcome(console: Console, name: str, outcome: Outcome) -> None:
    style = {Exit.OK: "green", Exit.TIMEOUT: "yellow"}.get(outcome.code, "red")
    console.print(f"[{style}]{escape(name)}: {escape(outcome.summary)}[/{style}]", highlight=False)
