"""Issue 14's overhead: Create throughput at concurrency 32 with metrics and tracing off, then on and exporting."""

from __future__ import annotations

import asyncio
import contextlib
import re
import urllib.request
from typing import Any

import grpc

from apphosting.v1 import deployments_pb2_grpc
from bench.load import LoadResult, closed_loop
from bench.plan import Plan
from bench.procs import Stack, proc_cpu_seconds, python
from bench.requests import create_request
from bench.stats import ratio, summary

CONCURRENCY = 32
GOAL_OVERHEAD = 0.10
# Prometheus scrapes every 15 s by default; once a second makes the metrics server's share visible.
_SCRAPE_INTERVAL = 1.0


async def _scrape(url: str, counts: list[int]) -> None:
    """Reads /metrics every second, as a Prometheus would, until cancelled."""
    while True:
        with contextlib.suppress(OSError):
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
            counts.append(len(body))
        await asyncio.sleep(_SCRAPE_INTERVAL)


def _spans(stack: Stack) -> int:
    """The spans the receiver has acknowledged, from the last count it printed."""
    found = re.findall(r"otlp: (\d+) spans", (stack.workdir / "otlp.out").read_text(errors="replace"))
    return int(found[-1]) if found else 0


async def run(off: Stack, on: Stack, plan: Plan, database: str, log: Any) -> dict[str, Any]:
    """`off`: the API as production starts it (no --metrics-listen, no OTEL_*). `on`: a metrics server scraped every
    second and every span exported over OTLP/gRPC to a receiver in its own process.

    The two APIs run side by side, each with its own database and nats-server, and are measured in alternation
    (off, on, on, off, ...), so a change in the machine's load falls on both alike.
    """
    receiver = on.start("otlp", python("bench.otlp"))
    otlp_port = int(receiver.wait_for_line(r"otlp: listening on [\d.]+:(\d+)").group(1))
    off_proc, off_port = off.api()
    on_proc, on_port = on.api(
        extra_args=("--metrics-listen", "127.0.0.1:0"),
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_TRACES_EXPORTER": "otlp",
            # Batches leave every half second, so spans are exported while the load runs, not at exit.
            "OTEL_BSP_SCHEDULE_DELAY": "500",
        },
    )
    metrics_url = on_proc.wait_for_line(r"api: metrics on (\S+)").group(1)
    if not metrics_url.rstrip("/").endswith("/metrics"):
        metrics_url = metrics_url.rstrip("/") + "/metrics"
    channels = {
        name: grpc.aio.insecure_channel(f"127.0.0.1:{port}") for name, port in (("off", off_port), ("on", on_port))
    }
    stubs = {name: deployments_pb2_grpc.DeploymentServiceStub(channel) for name, channel in channels.items()}
    pids = {"off": off_proc.pid, "on": on_proc.pid}
    runs: dict[str, list[LoadResult]] = {"off": [], "on": []}
    # The API's CPU seconds spent in the measured rounds: per Create, it repeats where rates do not.
    cpu = {"off": 0.0, "on": 0.0}
    next_index = {"off": 0, "on": 0}
    scrapes: list[int] = []
    scraper = asyncio.create_task(_scrape(metrics_url, scrapes))

    async def measure(name: str, requests: int, seconds: float, *, measured: bool = True) -> LoadResult:
        stub = stubs[name]
        before = proc_cpu_seconds(pids[name])

        async def call(index: int) -> None:
            await stub.CreateAppHostingDeployment(create_request(index), timeout=10)

        result = await closed_loop(
            call, concurrency=CONCURRENCY, max_requests=requests, duration=seconds, start=next_index[name]
        )
        next_index[name] += result.completed + result.errors
        after = proc_cpu_seconds(pids[name])
        if measured and before is not None and after is not None:
            cpu[name] += after - before
        return result

    try:
        for name in ("off", "on"):
            await measure(name, CONCURRENCY * 2, 2.0, measured=False)
        for round_ in range(plan.telemetry_rounds):
            order = ("off", "on") if round_ % 2 == 0 else ("on", "off")
            for name in order:
                runs[name].append(await measure(name, plan.create_requests, plan.create_seconds))
        # Let the last batch of spans leave before counting what arrived.
        await asyncio.sleep(1.5)
    finally:
        scraper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await scraper
        for channel in channels.values():
            await channel.close()

    def total(name: str) -> dict[str, Any]:
        done = runs[name]
        completed = sum(r.completed for r in done)
        elapsed = sum(r.elapsed for r in done)
        return {
            "rps": round(completed / elapsed, 1) if elapsed else 0.0,
            "requests": completed,
            "errors": sum(r.errors for r in done),
            "rounds_rps": [round(r.rps, 1) for r in done],
            "api_cpu_ms_per_create": round(cpu[name] * 1000 / completed, 3) if completed and cpu[name] else None,
            **summary([latency for r in done for latency in r.latencies]),
        }

    result_off, result_on = total("off"), total("on")
    on_to_off = ratio(result_on["rps"], result_off["rps"])
    overhead = None if on_to_off is None else round(1.0 - on_to_off, 3)
    spans = _spans(on)
    result: dict[str, Any] = {
        "database": database,
        "concurrency": CONCURRENCY,
        "off": result_off,
        "on": result_on,
        "ratio_on_to_off": on_to_off,
        "overhead": overhead,
        "goal_overhead": GOAL_OVERHEAD,
        "spans_exported": spans,
        "scrapes": len(scrapes),
        "metrics_bytes": scrapes[-1] if scrapes else None,
    }
    log(
        f"telemetry on {database}: off {result_off['rps']}/s, on {result_on['rps']}/s (ratio {on_to_off}, overhead "
        f"{overhead}); API CPU per Create off {result_off['api_cpu_ms_per_create']} ms, on "
        f"{result_on['api_cpu_ms_per_create']} ms; {spans} spans exported, {len(scrapes)} scrapes of /metrics"
    )
    return result
