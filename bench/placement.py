"""Placement time of the scheduler's Placer at growing numbers of locations in one region."""

from __future__ import annotations

import random
import time
from typing import Any

from apphosting.locations import Capacity, LocationConfig
from bench.plan import Plan
from bench.stats import summary
from scheduler.placement import Demand, Placer

# Issue 12: placement p99 at most GOAL_P99_MS with GOAL_LOCATIONS locations in the region.
GOAL_P99_MS = 1.0
GOAL_LOCATIONS = 10_000


def _locations(count: int, rng: random.Random) -> list[LocationConfig]:
    return [
        LocationConfig(
            id=f"loc-{index:05d}",
            provider="bench",
            region=f"eu-bench-{index % 50}",
            geographic_region="eu",
            capacity=Capacity(
                cpu=float(rng.choice((32, 64, 128))),
                memory_mb=rng.choice((131_072, 262_144, 524_288)),
                storage_gb=rng.choice((2000, 4000, 8000)),
                vclusters=rng.choice((100, 200, 400)),
            ),
            # A few are unhealthy or weighted, as in a real fleet.
            healthy=index % 20 != 7,
            weight=0.1 if index % 10 == 3 else 0.0,
        )
        for index in range(count)
    ]


def run(plan: Plan, log: Any) -> dict[str, Any]:
    rng = random.Random(7)
    by_size: dict[str, Any] = {}
    for size in plan.placement_sizes:
        locations = _locations(size, rng)
        built = time.perf_counter()
        placer = Placer(locations)
        index_ms = (time.perf_counter() - built) * 1000.0
        # Two thirds of the fleet holds reservations of various sizes.
        held = {
            location.id: Demand(
                cpu=rng.uniform(0, location.capacity.cpu * 0.9),
                memory_mb=rng.randint(0, int(location.capacity.memory_mb * 0.9)),
                storage_gb=rng.randint(0, int(location.capacity.storage_gb * 0.9)),
                vclusters=rng.randint(0, int(location.capacity.vclusters * 0.9)),
            )
            for location in locations
            if rng.random() < 2 / 3
        }
        # As the scheduler's ledger keeps it: per location, beside the index as arrays.
        used = placer.usage(held)
        demands = [
            Demand(
                cpu=rng.choice((0.25, 0.5, 2.0)), memory_mb=rng.choice((256, 512, 4096)), storage_gb=rng.randint(1, 50)
            )
            for _ in range(64)
        ]
        latencies: list[float] = []
        # The same calls in this thread's cpu time: on a loaded machine the wall-clock tail is mostly
        # the process waiting for a core, which this tells apart from the placement's own cost.
        cpu: list[float] = []
        deadline = time.perf_counter() + plan.placement_seconds
        for call in range(plan.placement_calls):
            if time.perf_counter() > deadline:
                break
            demand = demands[call % len(demands)]
            c0 = time.thread_time()
            t0 = time.perf_counter()
            placer.place(used, "eu", demand)
            latencies.append(time.perf_counter() - t0)
            cpu.append(time.thread_time() - c0)
        # What the scheduler's ledger calls for each placement: the choice with its explanation.
        explained: list[float] = []
        for call in range(plan.placement_calls):
            if time.perf_counter() > deadline + plan.placement_seconds:
                break
            demand = demands[call % len(demands)]
            t0 = time.perf_counter()
            placer.explain(used, "eu", demand)
            explained.append(time.perf_counter() - t0)
        explain = summary(explained)
        entry = by_size[str(size)] = {
            **summary(latencies),
            "index_build_ms": round(index_ms, 2),
            "cpu_p99_ms": summary(cpu)["p99_ms"],
            "explain_p50_ms": explain["p50_ms"],
            "explain_p99_ms": explain["p99_ms"],
        }
        log(
            f"placement at {size} locations: p50 {entry['p50_ms']} ms p99 {entry['p99_ms']} ms "
            f"(cpu time p99 {entry['cpu_p99_ms']} ms); "
            f"with its explanation p99 {entry['explain_p99_ms']} ms"
        )
    return {
        "p99_ms_by_locations": {size: entry["p99_ms"] for size, entry in by_size.items()},
        "by_locations": by_size,
    }
