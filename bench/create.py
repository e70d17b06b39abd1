"""Create throughput and latency at several concurrencies, each right after the echo ceiling at the same one."""

from __future__ import annotations

import time
from typing import Any

import grpc

from apphosting.v1 import deployments_pb2_grpc
from bench.load import closed_loop
from bench.plan import Plan
from bench.procs import Stack, python
from bench.requests import create_request
from bench.stats import ratio

# Issue 12: Create at concurrency 32 at least this share of the echo ceiling's rate, and at
# concurrency 1 a p50 at most this many times the echo's.
GOAL_RATIO_AT_32 = 0.5
GOAL_P50_RATIO_AT_1 = 2.0


async def run(stack: Stack, plan: Plan, database: str, log: Any) -> dict[str, Any]:
    _, port = stack.api()
    api_channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    api = deployments_pb2_grpc.DeploymentServiceStub(api_channel)
    # The echo server answers with a real Create response, so both sides move the same bytes.
    first = await api.CreateAppHostingDeployment(create_request(0), timeout=10)
    response_file = stack.workdir / "create-response.bin"
    response_file.write_bytes(first.SerializeToString())
    echo_proc = stack.start("echo", python("bench.echo", str(response_file)))
    echo_port = int(echo_proc.wait_for_line(r"echo: listening on [\d.]+:(\d+)").group(1))
    echo_channel = grpc.aio.insecure_channel(f"127.0.0.1:{echo_port}")
    echo = deployments_pb2_grpc.DeploymentServiceStub(echo_channel)
    # Same stub class, same method path: the client side is identical.
    body = create_request(0)

    async def call_echo(index: int) -> None:
        await echo.CreateAppHostingDeployment(body, timeout=10)

    async def call_api(index: int) -> None:
        await api.CreateAppHostingDeployment(create_request(index), timeout=10)

    next_index = 1
    levels: dict[str, dict[str, Any]] = {}
    try:
        for concurrency in plan.create_concurrency:
            # Warm both (connections, caches, pools) before measuring.
            await closed_loop(call_echo, concurrency=concurrency, max_requests=concurrency * 2, duration=2.0)
            warm = await closed_loop(
                call_api, concurrency=concurrency, max_requests=concurrency * 2, duration=2.0, start=next_index
            )
            next_index += warm.completed + warm.errors
            echo_result = await closed_loop(
                call_echo, concurrency=concurrency, max_requests=plan.create_requests * 4, duration=plan.create_seconds
            )
            rss_before = stack.procs[0].rss_mb()
            t0 = time.perf_counter()
            api_result = await closed_loop(
                call_api,
                concurrency=concurrency,
                max_requests=plan.create_requests,
                duration=plan.create_seconds,
                start=next_index,
            )
            next_index += api_result.completed + api_result.errors
            entry: dict[str, Any] = {
                "echo": echo_result.as_dict(),
                "create": api_result.as_dict(),
                "ratio_to_echo": ratio(api_result.rps, echo_result.rps),
                "api_rss_mb_before": rss_before,
                "api_rss_mb_after": stack.procs[0].rss_mb(),
                "seconds": round(time.perf_counter() - t0, 2),
            }
            levels[str(concurrency)] = entry
            log(
                f"create on {database} c={concurrency}: {api_result.rps:.0f}/s vs echo {echo_result.rps:.0f}/s "
                f"(ratio {entry['ratio_to_echo']}), p50 {entry['create']['p50_ms']} ms, "
                f"p99 {entry['create']['p99_ms']} ms, errors {api_result.errors}"
            )
    finally:
        await api_channel.close()
        await echo_channel.close()
    headline = levels.get("32") or next(iter(levels.values()))
    single = levels.get("1")
    return {
        "database": database,
        "rps": headline["create"]["rps"],
        "p50_ms": headline["create"]["p50_ms"],
        "p99_ms": headline["create"]["p99_ms"],
        "echo_rps": headline["echo"]["rps"],
        "ratio_to_echo": headline["ratio_to_echo"],
        # Issue 12: at concurrency 1, Create's p50 against the echo's p50 (goal ≤ 2x).
        "p50_ratio_to_echo_at_1": ratio(single["create"]["p50_ms"], single["echo"]["p50_ms"]) if single else None,
        "headline_concurrency": 32 if "32" in levels else plan.create_concurrency[0],
        "by_concurrency": levels,
        "stored": next_index,
    }
