"""How much each scenario does: the full run (a few minutes) and --quick (seconds, for CI's smoke test)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    quick: bool
    # Ceilings.
    nats_messages: int
    # Create, against the echo ceiling at the same concurrency.
    create_concurrency: tuple[int, ...]
    create_requests: int
    create_seconds: float
    # Pipeline: deployments created at pipeline_concurrency, waited for until they run.
    pipeline_provisioners: tuple[int, ...]
    pipeline_deployments: int
    pipeline_concurrency: int
    pipeline_seconds: float
    # Pipeline at an offered rate (pipeline.OFFERED_PER_SECOND) for this long, with the most provisioners.
    pipeline_offered_seconds: float
    # Image updates: deployments created and waited for, then each updated once at update_concurrency.
    update_provisioners: int
    update_deployments: int
    update_concurrency: int
    update_seconds: float
    # Watches: levels of open streams, `watch_per_deployment` streams per deployment.
    watch_levels: tuple[int, ...]
    watch_per_deployment: int
    watch_events: int
    watch_rate: float
    watch_open_seconds: float
    # Placement.
    placement_sizes: tuple[int, ...]
    placement_calls: int
    placement_seconds: float
    # List.
    list_sizes: tuple[int, ...]
    list_requests: int
    list_seconds: float
    list_insert_seconds: float
    # Telemetry overhead: alternating runs of create_requests/create_seconds at concurrency 32, off and on.
    telemetry_rounds: int


FULL = Plan(
    quick=False,
    nats_messages=2000,
    create_concurrency=(1, 32, 128),
    create_requests=4000,
    create_seconds=6.0,
    pipeline_provisioners=(1, 4),
    pipeline_deployments=1000,
    pipeline_concurrency=32,
    pipeline_seconds=60.0,
    pipeline_offered_seconds=20.0,
    update_provisioners=4,
    update_deployments=1000,
    update_concurrency=32,
    update_seconds=120.0,
    watch_levels=(100, 1000, 10_000),
    watch_per_deployment=10,
    watch_events=300,
    watch_rate=50.0,
    watch_open_seconds=120.0,
    placement_sizes=(10, 100, 1000, 10_000),
    placement_calls=2000,
    placement_seconds=5.0,
    list_sizes=(10_000, 100_000, 1_000_000),
    list_requests=300,
    list_seconds=6.0,
    list_insert_seconds=180.0,
    telemetry_rounds=4,
)

QUICK = Plan(
    quick=True,
    nats_messages=200,
    create_concurrency=(1, 32, 128),
    create_requests=300,
    create_seconds=0.5,
    pipeline_provisioners=(1,),
    pipeline_deployments=12,
    pipeline_concurrency=8,
    pipeline_seconds=20.0,
    pipeline_offered_seconds=0.2,
    update_provisioners=4,
    update_deployments=12,
    update_concurrency=8,
    update_seconds=30.0,
    watch_levels=(20, 100),
    watch_per_deployment=10,
    watch_events=20,
    watch_rate=50.0,
    watch_open_seconds=20.0,
    placement_sizes=(10, 100, 1000, 10_000),
    placement_calls=100,
    placement_seconds=0.5,
    list_sizes=(1_000, 5_000),
    list_requests=20,
    list_seconds=1.0,
    list_insert_seconds=20.0,
    telemetry_rounds=2,
)
