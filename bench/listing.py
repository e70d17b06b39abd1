"""List page latency as the deployments table grows: rows bulk-inserted into the API's SQLite file or PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
from sqlalchemy import Engine, create_engine, event, func, insert, select

from apphosting.v1 import deployments_pb2 as pb
from apphosting.v1 import deployments_pb2_grpc
from bench.plan import Plan
from bench.procs import Stack
from bench.requests import create_request
from bench.stats import summary
from services.deployments import paging
from services.deployments.servicer import LOCAL_USER_ID
from services.deployments.tables import DeploymentRow

if TYPE_CHECKING:
    from apphosting.v1.deployments_pb2_grpc import DeploymentServiceAsyncStub

_BATCH = 20_000
# The goal of issue 12: a page's p99 at a million rows.
GOAL_P99_MS = 5.0
_REGIONS = ("eu", "eu", "eu", "eu", "eu", "us", "us", "us", "us", "asia")


def _loader(path: str) -> Engine:
    engine = create_engine(f"sqlite:///{path}")

    def pragmas(connection: Any, _: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA busy_timeout=10000")
        # The loader alone: durability of a synthetic table is not what is measured.
        cursor.execute("PRAGMA synchronous=OFF")
        # A 1 GiB page cache keeps the growing indexes (two of them on random UUIDs) in memory.
        cursor.execute("PRAGMA cache_size=-1048576")
        cursor.close()

    event.listen(engine, "connect", pragmas)
    return engine


def _rows(start: int, stop: int, moment: datetime, template: dict[str, Any]) -> list[dict[str, Any]]:
    spec = dict(template)
    rows = []
    for index in range(start, stop):
        name = f"list-{index}"
        spec["deployment_name"] = name
        region = _REGIONS[index % len(_REGIONS)]
        spec["geographic_region"] = region
        rows.append(
            {
                "id": str(uuid.uuid4()),
                "user_id": LOCAL_USER_ID,
                "cluster_id": str(uuid.uuid4()),
                "name": name,
                "live_name": name,
                "app_type": "helm",
                # One in a hundred failed: a selective status filter.
                "status": "failed" if index % 100 == 42 else "running",
                "phase": "ready",
                "geographic_region": region,
                "spec": dict(spec),
                "request_id": None,
                "request_hash": "0" * 64,
                "revision": 7,
                "location_id": f"{region}-bench-a",
                "provider": "bench",
                "region": f"{region}-bench",
                "cluster_status": "running",
                "endpoint_url": f"https://{name}.apps.example.test",
                "is_adopted": False,
                "created_at": moment,
                "updated_at": moment,
            }
        )
    return rows


class _SQLiteLoader:
    """Executemany of INSERTs through SQLAlchemy into the API's SQLite file, beside the running API."""

    method = "SQLAlchemy executemany, 20,000 rows per transaction"

    def __init__(self, path: str) -> None:
        self.engine = _loader(path)

    async def count(self) -> int:
        with self.engine.connect() as connection:
            return connection.scalar(select(func.count()).select_from(DeploymentRow)) or 0

    async def template(self) -> dict[str, Any]:
        with self.engine.connect() as connection:
            return dict(connection.scalar(select(DeploymentRow.spec).limit(1)) or {})

    async def insert(self, rows: list[dict[str, Any]]) -> None:
        with self.engine.begin() as connection:
            connection.execute(insert(DeploymentRow), rows)

    async def settle(self) -> None:
        with self.engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")

    async def close(self) -> None:
        self.engine.dispose()


class _PostgresLoader:
    """COPY (binary) through asyncpg into the API's PostgreSQL database, then ANALYZE for the planner."""

    method = "COPY through asyncpg, 20,000 rows per transaction"

    def __init__(self, connection: asyncpg.Connection) -> None:
        self.connection = connection
        # Every column but the key, which the sequence fills; defaults are the model's, since COPY skips them.
        self.columns = [column for column in DeploymentRow.__table__.columns if column.name != "seq"]

    @classmethod
    async def open(cls, url: str) -> _PostgresLoader:
        return cls(await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://", 1)))

    async def count(self) -> int:
        return int(await self.connection.fetchval("SELECT count(*) FROM deployments"))

    async def template(self) -> dict[str, Any]:
        found = await self.connection.fetchval("SELECT spec FROM deployments LIMIT 1")
        return dict(json.loads(found)) if found else {}

    def _record(self, row: dict[str, Any]) -> tuple[Any, ...]:
        values = []
        for column in self.columns:
            if column.name in row:
                value = row[column.name]
            elif column.default is not None and column.default.is_scalar:
                value = column.default.arg
            else:
                value = None
            if column.name in ("spec", "placement") and value is not None:
                value = json.dumps(value)
            values.append(value)
        return tuple(values)

    async def insert(self, rows: list[dict[str, Any]]) -> None:
        await self.connection.copy_records_to_table(
            "deployments", records=[self._record(row) for row in rows], columns=[c.name for c in self.columns]
        )

    async def settle(self) -> None:
        # Fresh statistics, as autovacuum would give a table that grew this much.
        await self.connection.execute("ANALYZE deployments")

    async def close(self) -> None:
        await self.connection.close()


_Loader = _SQLiteLoader | _PostgresLoader


async def _grow(loader: _Loader, to: int, deadline: float, template: dict[str, Any]) -> tuple[int, float]:
    """Inserts rows until the table holds `to` (or the deadline passes); returns the count and rows/s."""
    have = await loader.count()
    began, start = time.perf_counter(), have
    moment = datetime.now(UTC)
    while have < to and time.perf_counter() < deadline:
        stop = min(to, have + _BATCH)
        await loader.insert(_rows(have, stop, moment, template))
        have = stop
        # The API shares nothing with this loop, but the client's own tasks get a turn.
        await asyncio.sleep(0)
    await loader.settle()
    elapsed = time.perf_counter() - began
    return have, (have - start) / elapsed if elapsed > 0 else 0.0


async def _measure(stub: DeploymentServiceAsyncStub, request: pb.ListDeploymentsRequest, plan: Plan) -> dict[str, Any]:
    for _ in range(5):
        await stub.ListDeployments(request, timeout=30)
    latencies: list[float] = []
    deadline = time.perf_counter() + plan.list_seconds
    for _ in range(plan.list_requests):
        if time.perf_counter() > deadline:
            break
        t0 = time.perf_counter()
        response = await stub.ListDeployments(request, timeout=30)
        latencies.append(time.perf_counter() - t0)
    result = summary(latencies)
    result["page_rows"] = len(response.deployments)
    return result


async def run(stack: Stack, plan: Plan, database: str, log: Any) -> dict[str, Any]:
    # The API migrates the database at start; rows are loaded beside it while it idles.
    api_proc, port = stack.api()
    loader: _Loader
    if stack.database_url.startswith("sqlite"):
        loader = _SQLiteLoader(stack.database_url.split("///", 1)[1])
    else:
        loader = await _PostgresLoader.open(stack.database_url)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = deployments_pb2_grpc.DeploymentServiceStub(channel)
    # The stored spec of a real Create is the template of every inserted row.
    await stub.CreateAppHostingDeployment(create_request(0), timeout=30)
    template = await loader.template()
    by_rows: dict[str, Any] = {}
    notes: list[str] = []
    insert_deadline = time.perf_counter() + plan.list_insert_seconds
    rate = 0.0
    try:
        for size in plan.list_sizes:
            have = await loader.count()
            remaining = insert_deadline - time.perf_counter()
            if rate > 0 and (size - have) / rate > remaining:
                fits = have + int(rate * max(0.0, insert_deadline - time.perf_counter()) * 0.9)
                notes.append(
                    f"{size:,} rows would take {(size - have) / rate:.0f} s to insert at {rate:,.0f} rows/s, "
                    f"past the {plan.list_insert_seconds:.0f} s bound; measured at the {fits:,} that fit instead"
                )
                size = fits
            t0 = time.perf_counter()
            have, rate = await _grow(loader, size, insert_deadline, template)
            insert_seconds = time.perf_counter() - t0
            middle = (have + 1) // 2
            queries = {
                "first_page": pb.ListDeploymentsRequest(page_size=50),
                "middle_page": pb.ListDeploymentsRequest(
                    page_size=50, page_token=paging.encode(middle, paging.filter_key(LOCAL_USER_ID, [], ""))
                ),
                "status_failed": pb.ListDeploymentsRequest(page_size=50, statuses=[pb.DEPLOYMENT_STATUS_FAILED]),
                "region_asia": pb.ListDeploymentsRequest(page_size=50, geographic_region="asia"),
            }
            measured = {name: await _measure(stub, request, plan) for name, request in queries.items()}
            p99s = [entry["p99_ms"] for entry in measured.values() if entry["p99_ms"] is not None]
            by_rows[str(have)] = {
                "rows": have,
                "insert_seconds": round(insert_seconds, 1),
                "insert_rows_per_second": round(rate),
                "p99_ms": max(p99s) if p99s else None,
                "ratio_to_goal": round(max(p99s) / GOAL_P99_MS, 3) if p99s else None,
                "queries": measured,
                "api_rss_mb": api_proc.rss_mb(),
            }
            log(
                f"list on {database} at {have:,} rows (inserted in {insert_seconds:.1f} s): "
                + ", ".join(f"{name} p99 {entry['p99_ms']} ms" for name, entry in measured.items())
            )
            if have < size:
                notes.append(f"insert stopped at {have:,} of {size:,} rows: the insert time bound was reached")
                break
    finally:
        await channel.close()
        await loader.close()
    largest = max((entry["rows"] for entry in by_rows.values()), default=0)
    return {
        "database": database,
        "insert_method": loader.method,
        "largest_rows": largest,
        "p99_ms": by_rows[str(largest)]["p99_ms"] if by_rows else None,
        "goal_p99_ms": GOAL_P99_MS,
        "ratio_to_goal": by_rows[str(largest)]["ratio_to_goal"] if by_rows else None,
        "p99_ms_by_rows": {rows: entry["p99_ms"] for rows, entry in by_rows.items()},
        "by_rows": by_rows,
        "notes": notes,
    }
