"""Tests of the scheduler's placement rules and of its capacity ledger on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import event, make_url, select
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from apphosting import resources
from apphosting.db import make_engine
from apphosting.locations import Capacity, LocationConfig, load_locations
from apphosting.v1 import deployments_pb2
from scheduler.ledger import Ledger
from scheduler.placement import (
    MAX_CANDIDATES,
    VECTOR_FROM,
    Demand,
    Placed,
    Placement,
    Placer,
    Refused,
    demand_of,
    place,
)
from scheduler.tables import LedgerClock, Reservation

_POSTGRES_ADMIN_URL = os.environ.get("APPHOSTING_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")

SMALL = Demand(cpu=1.0, memory_mb=1024, storage_gb=10)


def _location(
    location_id: str,
    *,
    geographic_region: str = "eu",
    cpu: float = 8.0,
    memory_mb: int = 16384,
    storage_gb: int = 100,
    vclusters: int = 10,
    healthy: bool = True,
    weight: float = 0.0,
) -> LocationConfig:
    return LocationConfig(
        id=location_id,
        provider="test",
        region=f"{geographic_region}-{location_id}",
        geographic_region=geographic_region,
        capacity=Capacity(cpu=cpu, memory_mb=memory_mb, storage_gb=storage_gb, vclusters=vclusters),
        healthy=healthy,
        weight=weight,
    )


def _placed_id(placement: Placement) -> str:
    assert isinstance(placement, Placed), placement
    return placement.location.id


def _refusal(placement: Placement) -> str:
    assert isinstance(placement, Refused), placement
    return placement.message


# --- placement -------------------------------------------------------------------------------


def test_picks_a_healthy_location_of_the_region_that_fits() -> None:
    locations = (
        _location("eu-down", healthy=False, cpu=64),
        _location("eu-tiny", cpu=0.5),
        _location("us-big", geographic_region="us", cpu=64),
        _location("eu-ok"),
    )
    assert _placed_id(place(locations, {}, "eu", SMALL)) == "eu-ok"


def test_prefers_the_location_left_least_full_in_its_fullest_dimension() -> None:
    locations = (_location("eu-a"), _location("eu-b"))
    # eu-a has idle cpu but its memory is nearly gone; eu-b is busier on average but balanced.
    used = {
        "eu-a": Demand(cpu=0.0, memory_mb=14000, storage_gb=0, vclusters=1),
        "eu-b": Demand(cpu=4.0, memory_mb=8192, storage_gb=50, vclusters=5),
    }
    assert _placed_id(place(locations, used, "eu", SMALL)) == "eu-b"


def test_equal_scores_go_to_the_smallest_id_whatever_the_order() -> None:
    locations = [_location("eu-c"), _location("eu-a"), _location("eu-b")]
    assert _placed_id(place(locations, {}, "eu", SMALL)) == "eu-a"
    assert _placed_id(place(list(reversed(locations)), {}, "eu", SMALL)) == "eu-a"


def test_weight_prefers_or_drains_a_location() -> None:
    preferred = (_location("eu-a"), _location("eu-b", weight=0.1))
    assert _placed_id(place(preferred, {}, "eu", SMALL)) == "eu-b"
    drained = (_location("eu-a", weight=-10), _location("eu-b"))
    # eu-b is fuller, but eu-a is being drained.
    used = {"eu-b": Demand(cpu=6.0, memory_mb=0, storage_gb=0, vclusters=0)}
    assert _placed_id(place(drained, used, "eu", SMALL)) == "eu-b"
    # A drained location still takes work when it is the only one with room.
    used["eu-b"] = Demand(cpu=8.0, memory_mb=0, storage_gb=0, vclusters=0)
    assert _placed_id(place(drained, used, "eu", SMALL)) == "eu-a"


def test_a_demand_that_fills_a_location_exactly_fits() -> None:
    locations = (_location("eu-a", cpu=2.0, memory_mb=1000, storage_gb=10, vclusters=10),)
    # Ten reservations of 0.1 cpu sum to 0.9999999999999999 (or more), not 1.0.
    used = {"eu-a": Demand(cpu=sum([0.1] * 10), memory_mb=0, storage_gb=0, vclusters=9)}
    demand = Demand(cpu=1.0, memory_mb=1000, storage_gb=10)
    assert _placed_id(place(locations, used, "eu", demand)) == "eu-a"


def test_unknown_region_is_refused_naming_the_known_ones() -> None:
    locations = (_location("eu-a"), _location("us-a", geographic_region="us"))
    assert _refusal(place(locations, {}, "xx", SMALL)) == ("no location in geographic region 'xx' (known: eu, us)")


def test_a_region_with_only_unhealthy_locations_is_refused_as_such() -> None:
    locations = (
        _location("eu-b", healthy=False),
        _location("eu-a", healthy=False),
        _location("us-a", geographic_region="us"),
    )
    assert _refusal(place(locations, {}, "eu", SMALL)) == (
        "no healthy location in geographic region 'eu': all 2 are unhealthy (eu-a, eu-b)"
    )


@pytest.mark.parametrize(
    ("demand", "short"),
    [
        (Demand(cpu=3.0, memory_mb=1024, storage_gb=10), ["cpu 2.0 (short 1.0)"]),
        (Demand(cpu=1.0, memory_mb=8192, storage_gb=10), ["memory 4096 MiB (short 4096 MiB)"]),
        (Demand(cpu=1.0, memory_mb=1024, storage_gb=30), ["storage 20 GiB (short 10 GiB)"]),
        (Demand(cpu=1.0, memory_mb=1024, storage_gb=10, vclusters=2), ["vCluster slots 1 (short 1)"]),
        (
            Demand(cpu=4.0, memory_mb=8192, storage_gb=30, vclusters=2),
            [
                "cpu 2.0 (short 2.0)",
                "memory 4096 MiB (short 4096 MiB)",
                "storage 20 GiB (short 10 GiB)",
                "vCluster slots 1 (short 1)",
            ],
        ),
    ],
)
def test_no_room_names_the_region_and_every_short_dimension(demand: Demand, short: list[str]) -> None:
    locations = (
        _location("eu-a", cpu=4, memory_mb=8192, storage_gb=40, vclusters=2),
        _location("eu-b", cpu=1, memory_mb=1024, storage_gb=10, vclusters=1),
        _location("eu-sick", healthy=False, cpu=64),
    )
    used = {"eu-a": Demand(cpu=2.0, memory_mb=4096, storage_gb=20, vclusters=1)}
    message = _refusal(place(locations, used, "eu", demand))
    assert message.startswith(
        f"no location in 'eu' has room for cpu {demand.cpu}, memory {demand.memory_mb} MiB, "
        f"storage {demand.storage_gb} GiB, vCluster slots {demand.vclusters}: best free is eu-a with "
    )
    for part in short:
        assert part in message
    assert message.count("short") == len(short)
    assert message.endswith("; unhealthy, not considered: eu-sick")


def test_the_sample_locations_place_and_refuse() -> None:
    locations = load_locations().locations
    assert _placed_id(place(locations, {}, "us", SMALL)) == "us-nyc1-a"
    message = _refusal(place(locations, {}, "eu", Demand(cpu=100.0, memory_mb=1024, storage_gb=10)))
    assert "best free is eu-fsn1-a with cpu 64.0 (short 36.0)" in message


def test_demand_of_uses_the_kernel_defaults_for_unset_fields() -> None:
    assert demand_of(deployments_pb2.Deployment()) == Demand(
        cpu=resources.DEFAULT_CPU * resources.DEFAULT_REPLICAS,
        memory_mb=resources.DEFAULT_MEMORY_MB * resources.DEFAULT_REPLICAS,
        storage_gb=0,
        vclusters=1,
    )
    assert demand_of(deployments_pb2.Deployment(replicas=2)) == Demand(cpu=0.5, memory_mb=512, storage_gb=0)


def test_demand_of_multiplies_by_replicas_and_adds_volumes() -> None:
    deployment = deployments_pb2.Deployment(
        cpu_request=0.5,
        memory_request_mb=512,
        replicas=3,
        storage_size_gb=5,
        volumes=[
            deployments_pb2.VolumeConfig(path="/data", size_gb=20),
            deployments_pb2.VolumeConfig(path="/x"),
        ],
    )
    assert demand_of(deployment) == Demand(cpu=1.5, memory_mb=1536, storage_gb=35, vclusters=1)


def test_demand_of_honours_explicit_zeroes() -> None:
    deployment = deployments_pb2.Deployment(
        cpu_request=0.0,
        memory_request_mb=0,
        replicas=0,
        storage_size_gb=0,
        volumes=[deployments_pb2.VolumeConfig(path="/v", size_gb=0)],
    )
    assert demand_of(deployment) == Demand(cpu=0.0, memory_mb=0, storage_gb=0, vclusters=1)


def test_a_negative_demand_is_rejected() -> None:
    with pytest.raises(ValueError, match="negative"):
        Demand(cpu=-1.0, memory_mb=0, storage_gb=0)
    with pytest.raises(ValueError, match="negative"):
        Demand(cpu=float("nan"), memory_mb=0, storage_gb=0)


def test_demand_of_a_stopped_deployment_keeps_only_storage_and_an_adopted_one_takes_no_vcluster() -> None:
    stopped = deployments_pb2.Deployment(
        cpu_request=1.0, memory_request_mb=512, storage_size_gb=5, status=deployments_pb2.DEPLOYMENT_STATUS_STOPPED
    )
    assert demand_of(stopped) == Demand(cpu=0.0, memory_mb=0, storage_gb=5, vclusters=1)
    adopted = deployments_pb2.Deployment(cpu_request=1.0, memory_request_mb=512, is_adopted=True)
    assert demand_of(adopted) == Demand(cpu=1.0, memory_mb=512, storage_gb=0, vclusters=0)


# --- explanations ----------------------------------------------------------------------------


def _reasons(placer: Placer, used: dict[str, Demand], demand: Demand, pinned: str | None = None) -> dict[str, str]:
    explanation = placer.explain(used, "eu", demand, pinned).explanation
    return {c.location_id: c.reason for c in explanation.candidates}


def test_explain_lists_every_candidate_best_first_with_why_the_others_lost() -> None:
    placer = Placer(
        (
            _location("eu-a"),
            _location("eu-b", weight=0.25),
            _location("eu-sick", healthy=False),
            _location("eu-small", cpu=1.5, memory_mb=1024, storage_gb=5),
            _location("us-a", geographic_region="us"),
        )
    )
    used = {"eu-small": Demand(cpu=1.0, memory_mb=512, storage_gb=0, vclusters=0)}
    explained = placer.explain(used, "eu", SMALL)
    assert _placed_id(explained.placement) == "eu-b"
    explanation = explained.explanation
    assert explanation.chosen_location_id == "eu-b"
    assert explanation.refusal == ""
    assert explanation.more == 0
    candidates = list(explanation.candidates)
    assert [c.location_id for c in candidates][:2] == ["eu-b", "eu-a"]
    assert candidates[0].chosen
    assert not any(c.chosen for c in candidates[1:])
    # 1 + weight - the worst utilisation after placing (cpu: 1 of 8).
    assert candidates[0].score == pytest.approx(1.25 - 1 / 8)
    assert candidates[0].weight == 0.25
    assert [c.score for c in candidates] == sorted((c.score for c in candidates), reverse=True)
    assert {c.location_id: c.reason for c in candidates} == {
        "eu-b": "",
        "eu-a": "lower score",
        "eu-sick": "unhealthy",
        "eu-small": "short of cpu by 0.5, memory by 512 MiB, storage by 5 GiB",
    }


def test_explain_chooses_what_place_chooses() -> None:
    locations = tuple(_location(f"eu-{i:02d}", cpu=4.0 + i % 3, weight=(i % 5) / 10) for i in range(30))
    placer = Placer(locations)
    for step in range(20):
        used = {f"eu-{i:02d}": Demand(cpu=(i * step) % 4, memory_mb=0, storage_gb=0, vclusters=0) for i in range(30)}
        assert placer.explain(used, "eu", SMALL).placement == place(locations, used, "eu", SMALL)


def test_explain_lists_the_best_twenty_and_counts_the_rest() -> None:
    placer = Placer(tuple(_location(f"eu-{i:02d}", weight=i / 100) for i in range(25)))
    explanation = placer.explain({}, "eu", SMALL).explanation
    assert len(explanation.candidates) == MAX_CANDIDATES
    assert explanation.more == 5
    assert explanation.candidates[0].location_id == "eu-24"
    assert explanation.candidates[-1].location_id == "eu-05"


def test_explain_a_refusal_gives_the_message_of_place_and_every_shortfall() -> None:
    locations = (_location("eu-a", cpu=1.0), _location("eu-b", healthy=False))
    placer = Placer(locations)
    demand = Demand(cpu=2.0, memory_mb=1024, storage_gb=10, vclusters=11)
    explained = placer.explain({}, "eu", demand)
    assert explained.placement == place(locations, {}, "eu", demand)
    assert explained.explanation.refusal == _refusal(explained.placement)
    assert explained.explanation.chosen_location_id == ""
    assert _reasons(placer, {}, demand) == {"eu-a": "short of cpu by 1.0, vCluster slots by 1", "eu-b": "unhealthy"}


def test_pinned_placement_considers_only_that_location() -> None:
    placer = Placer((_location("eu-a", weight=1.0), _location("eu-b"), _location("us-a", geographic_region="us")))
    explained = placer.explain({}, "eu", SMALL, pinned="eu-b")
    assert _placed_id(explained.placement) == "eu-b"
    assert _reasons(placer, {}, SMALL, "eu-b") == {"eu-b": "", "eu-a": "not the pinned location"}
    # A location of another region can be pinned (promote to a location).
    assert _placed_id(placer.explain({}, "eu", SMALL, pinned="us-a").placement) == "us-a"


@pytest.mark.parametrize(
    ("pinned", "used", "refusal"),
    [
        ("eu-x", {}, "unknown location 'eu-x'"),
        ("eu-sick", {}, "location eu-sick is unhealthy"),
        (
            "eu-b",
            {"eu-b": Demand(cpu=7.5, memory_mb=16000, storage_gb=0, vclusters=0)},
            "location eu-b is short of cpu by 0.5, memory by 640 MiB",
        ),
    ],
)
def test_a_pinned_placement_is_refused_saying_why(pinned: str, used: dict[str, Demand], refusal: str) -> None:
    placer = Placer((_location("eu-a"), _location("eu-b"), _location("eu-sick", healthy=False)))
    explained = placer.explain(used, "eu", SMALL, pinned=pinned)
    assert _refusal(explained.placement) == refusal
    assert explained.explanation.refusal == refusal
    assert not any(c.chosen for c in explained.explanation.candidates)


# --- the vector path and Usage ------------------------------------------------------------------

_capacities = st.tuples(
    st.sampled_from((0.5, 1.0, 2.0, 8.0, 64.0)),
    st.sampled_from((512, 1024, 16384, 262_144)),
    st.sampled_from((10, 100, 4000)),
    st.sampled_from((1, 2, 10, 400)),
)
_demands = st.builds(
    Demand,
    cpu=st.sampled_from((0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0)),
    memory_mb=st.sampled_from((0, 128, 512, 1024, 4096)),
    storage_gb=st.integers(0, 60),
    vclusters=st.integers(0, 2),
)


@st.composite
def _fleets(draw: st.DrawFn) -> tuple[list[LocationConfig], dict[str, Demand]]:
    """A region with enough healthy locations for the vector path, many alike (ties), some full."""
    count = draw(st.integers(VECTOR_FROM, VECTOR_FROM * 3))
    locations = []
    held: dict[str, Demand] = {}
    for index in range(count):
        cpu, memory_mb, storage_gb, vclusters = draw(_capacities)
        location_id = f"eu-{draw(st.integers(0, 10_000)):05d}-{index}"
        locations.append(
            _location(
                location_id,
                cpu=cpu,
                memory_mb=memory_mb,
                storage_gb=storage_gb,
                vclusters=vclusters,
                healthy=index < VECTOR_FROM or draw(st.booleans()),
                weight=draw(st.sampled_from((0.0, 0.0, 0.1, -10.0))),
            )
        )
        fill = draw(st.sampled_from((None, 0.0, 0.5, 0.9, 1.0, 1.2)))
        if fill is not None:
            # Sums of tenths, as the ledger's are, with their rounding noise; some over capacity.
            held[location_id] = Demand(
                cpu=sum([0.1] * round(cpu * fill * 10)),
                memory_mb=round(memory_mb * fill),
                storage_gb=round(storage_gb * fill),
                vclusters=round(vclusters * fill),
            )
    return locations, held


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fleet=_fleets(), demand=_demands)
def test_the_vector_path_chooses_exactly_what_the_reference_loop_chooses(
    fleet: tuple[list[LocationConfig], dict[str, Demand]], demand: Demand
) -> None:
    locations, held = fleet
    placer = Placer(locations)
    usage = placer.usage(held)
    # A plain dict takes the reference loop; a Usage of this placer takes the vector path.
    assert placer.place(usage, "eu", demand) == placer.place(held, "eu", demand)
    # The same for the explanation: the same rows, in the same order, and the same choice or refusal.
    assert placer.explain(usage, "eu", demand) == placer.explain(held, "eu", demand)


def test_usage_is_the_mapping_it_was_given_and_follows_set_and_add() -> None:
    locations = [_location(f"eu-{index:02d}") for index in range(VECTOR_FROM)] + [
        _location("eu-sick", healthy=False),
        _location("us-a", geographic_region="us"),
    ]
    placer = Placer(locations)
    usage = placer.usage({"eu-sick": SMALL})
    assert dict(usage) == {"eu-sick": SMALL}
    # Filling every location but the last leaves the last as the only choice, on both paths.
    for location in locations[: VECTOR_FROM - 1]:
        usage.set(location.id, Demand(cpu=8.0, memory_mb=0, storage_gb=0, vclusters=0))
    last = locations[VECTOR_FROM - 1].id
    assert _placed_id(placer.place(usage, "eu", SMALL)) == last
    assert _placed_id(placer.place(dict(usage), "eu", SMALL)) == last
    # A reservation added and taken away again leaves it as it was; taking away more than held stops at nothing.
    usage.add(last, SMALL)
    assert usage[last] == SMALL
    usage.add(last, SMALL, sign=-1)
    usage.add(last, SMALL, sign=-1)
    assert usage[last] == Demand(cpu=0.0, memory_mb=0, storage_gb=0, vclusters=0)
    usage.add(last, Demand(cpu=7.5, memory_mb=0, storage_gb=0, vclusters=0))
    refusal = _refusal(placer.place(usage, "eu", SMALL))
    assert refusal == _refusal(placer.place(dict(usage), "eu", SMALL))
    assert refusal.startswith("no location in 'eu' has room for cpu 1.0, memory 1024 MiB, storage 10 GiB")
    assert f"best free is {last} with cpu 0.5 (short 0.5)" in refusal
    assert refusal.endswith("; unhealthy, not considered: eu-sick")
    # Usage of a location in another region, or no longer configured, is kept (eu-sick, the eu ones,
    # us-a and gone) but scored nowhere.
    usage.set("us-a", SMALL)
    usage.set("gone", SMALL)
    assert usage["gone"] == SMALL
    assert len(usage) == VECTOR_FROM + 3


# --- ledger ----------------------------------------------------------------------------------

# Room for exactly 20 of ONE_OF_20 in every dimension, with vCluster slots to spare.
ROOM_FOR_20 = (_location("eu-only", cpu=5.0, memory_mb=20 * 256, storage_gb=20 * 5, vclusters=100),)
ONE_OF_20 = Demand(cpu=0.25, memory_mb=256, storage_gb=5)

EngineFactory = Callable[[], AsyncEngine]


@contextlib.asynccontextmanager
async def _ledgers(make: EngineFactory, count: int) -> AsyncIterator[list[Ledger]]:
    engines = [make() for _ in range(count)]
    try:
        ledgers = [Ledger(engine, ROOM_FOR_20) for engine in engines]
        for ledger in ledgers:
            await ledger.create_tables()
        yield ledgers
    finally:
        for engine in engines:
            await engine.dispose()


@pytest.fixture
def sqlite_engines(tmp_path: Path) -> EngineFactory:
    return lambda: create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/s.db")


async def test_reserve_release_and_reserve_again(sqlite_engines: EngineFactory) -> None:
    async with _ledgers(sqlite_engines, 1) as (ledger,):
        assert _placed_id(await ledger.reserve("d-1", "eu", ONE_OF_20)) == "eu-only"
        assert await ledger.used() == {"eu-only": ONE_OF_20}
        assert await ledger.release("d-1") is True
        assert await ledger.used() == {}
        assert await ledger.release("d-1") is False
        assert _placed_id(await ledger.reserve("d-1", "eu", ONE_OF_20)) == "eu-only"


async def test_reserving_twice_holds_the_capacity_once(sqlite_engines: EngineFactory) -> None:
    async with _ledgers(sqlite_engines, 1) as (ledger,):
        first = await ledger.reserve("d-1", "eu", ONE_OF_20)
        # A redelivered request, even with a different demand, gets the same answer and no more.
        again = await ledger.reserve("d-1", "eu", Demand(cpu=1.0, memory_mb=512, storage_gb=10))
        assert first == again
        assert await ledger.used() == {"eu-only": ONE_OF_20}


async def test_a_refusal_reserves_nothing(sqlite_engines: EngineFactory) -> None:
    async with _ledgers(sqlite_engines, 1) as (ledger,):
        assert "known: eu" in _refusal(await ledger.reserve("d-1", "xx", ONE_OF_20))
        assert "short" in _refusal(await ledger.reserve("d-2", "eu", Demand(cpu=6.0, memory_mb=0, storage_gb=0)))
        assert await ledger.used() == {}


async def test_reservations_record_an_aware_creation_time(sqlite_engines: EngineFactory) -> None:
    async with _ledgers(sqlite_engines, 1) as (ledger,):
        before = datetime.now(UTC)
        await ledger.reserve("d-1", "eu", ONE_OF_20)
        reader = sqlite_engines()
        async with reader.connect() as conn:
            created = await conn.scalar(select(Reservation.created_at))
        await reader.dispose()
        assert created is not None
        assert created.tzinfo is not None
        assert before.replace(microsecond=0) <= created <= datetime.now(UTC)


async def _fifty_compete_for_twenty(ledgers: list[Ledger]) -> list[str]:
    """Races 50 reservations for room for 20 and returns the ids of the deployments placed."""
    capacity = ROOM_FOR_20[0].capacity
    overbooked: list[Demand] = []
    done = asyncio.Event()

    async def watch() -> None:
        # Samples usage while the reservations race, not only once they are over.
        while not done.is_set():
            used = (await ledgers[0].used()).get("eu-only")
            if used is not None and (used.cpu > capacity.cpu or used.memory_mb > capacity.memory_mb):
                overbooked.append(used)
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    try:
        results = await asyncio.gather(
            *(ledgers[i % len(ledgers)].reserve(f"d-{i:02d}", "eu", ONE_OF_20) for i in range(50))
        )
    finally:
        done.set()
        await watcher
    placed = [f"d-{i:02d}" for i, result in enumerate(results) if isinstance(result, Placed)]
    refused = [result for result in results if isinstance(result, Refused)]
    assert len(placed) == 20
    assert len(refused) == 30
    assert all("short" in refusal.message for refusal in refused)
    assert overbooked == []
    assert await ledgers[0].used() == {"eu-only": Demand(cpu=5.0, memory_mb=5120, storage_gb=100, vclusters=20)}
    return placed


async def test_fifty_concurrent_reservations_fill_exactly_the_room(sqlite_engines: EngineFactory) -> None:
    async with _ledgers(sqlite_engines, 1) as ledgers:
        await _fifty_compete_for_twenty(ledgers)


@pytest.mark.parametrize("journal", ["rollback journal", "WAL"])
async def test_two_scheduler_processes_on_one_sqlite_file_never_overbook(tmp_path: Path, journal: str) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/s.db"

    def make() -> AsyncEngine:
        return make_engine(url) if journal == "WAL" else create_async_engine(url)

    async with _ledgers(make, 2) as ledgers:
        await _fifty_compete_for_twenty(ledgers)


async def _postgres_unreachable() -> str | None:
    try:
        conn = await asyncpg.connect(_POSTGRES_ADMIN_URL, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError) as error:
        return f"PostgreSQL is not reachable at {_POSTGRES_ADMIN_URL} ({error!r})"
    await conn.close()
    return None


@pytest.fixture
async def postgres_engines() -> AsyncIterator[EngineFactory]:
    async with _postgres_database() as make:
        yield make


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def any_engines(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[EngineFactory]:
    """Engines on SQLite, then on PostgreSQL."""
    if request.param == "sqlite":
        yield lambda: create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/s.db")
        return
    async with _postgres_database() as make:
        yield make


@contextlib.asynccontextmanager
async def _postgres_database() -> AsyncIterator[EngineFactory]:
    """Engines on a fresh database, dropped afterwards, so that runs never see each other's rows."""
    reason = await _postgres_unreachable()
    if reason is not None:
        pytest.skip(reason)
    name = f"test_scheduler_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(_POSTGRES_ADMIN_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        url = make_url(_POSTGRES_ADMIN_URL).set(drivername="postgresql+asyncpg", database=name)
        try:
            yield lambda: create_async_engine(url)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.mark.postgres
async def test_two_scheduler_processes_on_postgres_never_overbook(postgres_engines: EngineFactory) -> None:
    async with _ledgers(postgres_engines, 2) as ledgers:
        placed = await _fifty_compete_for_twenty(ledgers)
        assert await ledgers[1].release(placed[0]) is True
        assert _placed_id(await ledgers[0].reserve("d-new", "eu", ONE_OF_20)) == "eu-only"
        assert "short" in _refusal(await ledgers[1].reserve("d-newer", "eu", ONE_OF_20))


async def test_a_pinned_reservation_goes_there_or_nowhere(sqlite_engines: EngineFactory) -> None:
    engine = sqlite_engines()
    ledger = Ledger(engine, (_location("eu-a", weight=1.0), _location("eu-b", cpu=1.0)))
    try:
        await ledger.create_tables()
        explained = await ledger.place("d-1", "eu", SMALL, pinned="eu-b")
        assert _placed_id(explained.placement) == "eu-b"
        assert explained.explanation.chosen_location_id == "eu-b"
        assert "short of cpu by 1.0" in _refusal(await ledger.reserve("d-2", "eu", SMALL, pinned="eu-b"))
        # A redelivery gets where it holds, explained as chosen.
        again = await ledger.place("d-1", "eu", SMALL, pinned="eu-b")
        assert again.explanation.chosen_location_id == "eu-b"
        assert [c.location_id for c in again.explanation.candidates if c.chosen] == ["eu-b"]
    finally:
        await engine.dispose()


async def test_stop_frees_cpu_and_memory_and_keeps_storage_and_the_slot(sqlite_engines: EngineFactory) -> None:
    async with _ledgers(sqlite_engines, 1) as (ledger,):
        await ledger.reserve("d-1", "eu", ONE_OF_20)
        assert await ledger.stop("d-1") is True
        assert await ledger.stop("d-1") is True
        assert await ledger.used() == {"eu-only": Demand(cpu=0.0, memory_mb=0, storage_gb=5, vclusters=1)}
        assert await ledger.stop("d-gone") is False


async def test_set_reservation_sets_rather_than_adds_and_never_overbooks(sqlite_engines: EngineFactory) -> None:
    async with _ledgers(sqlite_engines, 1) as (ledger,):
        await ledger.reserve("d-1", "eu", ONE_OF_20)
        # Its own holding counts as free: growing to the whole location fits.
        whole = Demand(cpu=5.0, memory_mb=5120, storage_gb=100)
        assert isinstance((await ledger.check("d-1", "eu-only", whole)).placement, Placed)
        assert isinstance((await ledger.set_reservation("d-1", "eu-only", whole)).placement, Placed)
        assert isinstance((await ledger.set_reservation("d-1", "eu-only", whole)).placement, Placed)
        assert await ledger.used() == {"eu-only": whole}
        refused = await ledger.set_reservation("d-2", "eu-only", ONE_OF_20)
        assert (
            _refusal(refused.placement)
            == "location eu-only is short of cpu by 0.25, memory by 256 MiB, storage by 5 GiB"
        )
        assert _refusal((await ledger.check("d-1", "nowhere", ONE_OF_20)).placement) == "unknown location 'nowhere'"
        assert await ledger.holding("d-2") is None


async def test_the_totals_per_location_stay_the_sum_of_the_reservations(any_engines: EngineFactory) -> None:
    make = any_engines
    fleet = tuple(
        _location(f"eu-{index}", cpu=64, memory_mb=1 << 20, storage_gb=10_000, vclusters=100) for index in range(3)
    )
    engine_a, engine_b = make(), make()
    first, second = Ledger(engine_a, fleet), Ledger(engine_b, fleet)
    try:
        await first.create_tables()
        await second.create_tables()
        tenth = Demand(cpu=0.1, memory_mb=100, storage_gb=1)
        # Two ledgers (two scheduler processes) reserve, move, stop and release, some of it twice at once.
        await asyncio.gather(
            *(
                (first, second)[i % 2].reserve(
                    f"d-{i:02d}", "eu", Demand(cpu=0.1 * (i % 7 + 1), memory_mb=100 * i, storage_gb=i)
                )
                for i in range(30)
            )
        )
        await asyncio.gather(
            *(
                ledger.set_reservation(f"d-{i:02d}", f"eu-{i % 3}", tenth)
                for i in range(0, 30, 3)
                for ledger in (first, second)
            )
        )
        await asyncio.gather(*(ledger.stop(f"d-{i:02d}") for i in range(1, 30, 4) for ledger in (first, second)))
        await asyncio.gather(*(ledger.release(f"d-{i:02d}") for i in range(2, 30, 5) for ledger in (first, second)))
        async with engine_a.connect() as conn:
            rows = (await conn.execute(select(Reservation.__table__))).all()
        summed: dict[str, list[float]] = {}
        for row in rows:
            total = summed.setdefault(row.location_id, [0, 0, 0, 0])
            for index, value in enumerate((row.cpu, row.memory_mb, row.storage_gb, row.vclusters)):
                total[index] += value
        expected = {
            location_id: (round(cpu, 6), memory, storage, vcs)
            for location_id, (cpu, memory, storage, vcs) in summed.items()
        }
        for ledger in (first, second):
            used = await ledger.used()
            assert {
                location_id: (round(d.cpu, 6), d.memory_mb, d.storage_gb, d.vclusters)
                for location_id, d in used.items()
            } == expected
        # Releasing everything leaves nothing held anywhere.
        await asyncio.gather(*(first.release(f"d-{i:02d}") for i in range(30)))
        assert await second.used() == {}
    finally:
        await engine_a.dispose()
        await engine_b.dispose()


async def test_a_ledger_keeps_its_totals_only_while_no_other_process_wrote(any_engines: EngineFactory) -> None:
    async with _ledgers(any_engines, 2) as (first, second):
        for index in range(10):
            assert isinstance(await first.reserve(f"a-{index}", "eu", ONE_OF_20), Placed)
        # Its own reservations keep its totals current without reading them again.
        kept = first._cache
        assert kept is not None
        assert kept["eu-only"] == Demand(cpu=2.5, memory_mb=2560, storage_gb=50, vclusters=10)
        for index in range(10):
            assert isinstance(await second.reserve(f"b-{index}", "eu", ONE_OF_20), Placed)
        # The other process's ten moved the clock: the first reads the totals again and is full.
        assert "short" in _refusal(await first.reserve("a-full", "eu", ONE_OF_20))
        assert await second.release("a-3") is True
        assert _placed_id(await first.reserve("a-again", "eu", ONE_OF_20)) == "eu-only"
        kept_after_reading_again = first._cache
        assert kept_after_reading_again is not None
        assert kept_after_reading_again is not kept
        assert "short" in _refusal(await second.reserve("b-full", "eu", ONE_OF_20))
        # A release and a stop by the ledger itself free room in what it keeps.
        assert await first.release("a-again") is True
        assert await first.stop("a-4") is True
        assert first._cache is kept_after_reading_again
        assert dict(kept_after_reading_again) == dict(await first.used())
        # 19 held (a-3 and a-again released), a-4 stopped: it keeps its storage and its slot.
        assert kept_after_reading_again["eu-only"].storage_gb == 95
        assert kept_after_reading_again["eu-only"].memory_mb == 18 * 256


async def test_the_migration_to_totals_counts_the_reservations_already_held(any_engines: EngineFactory) -> None:
    async with _ledgers(any_engines, 1) as (ledger,):
        for index in range(3):
            await ledger.reserve(f"d-{index}", "eu", Demand(cpu=0.1, memory_mb=256, storage_gb=5))
        expected = await ledger.used()
        # As a database the scheduler used before migration 0002: reservations, no totals, no clock.
        engine = any_engines()
        try:
            async with engine.begin() as conn:
                await conn.exec_driver_sql("DROP TABLE scheduler_location_usage")
                await conn.exec_driver_sql("DROP TABLE scheduler_ledger_clock")
                await conn.exec_driver_sql("UPDATE alembic_version_scheduler SET version_num = '0001'")
        finally:
            await engine.dispose()
        await ledger.create_tables()
        assert dict(await ledger.used()) == dict(expected)
        # Three tenths of a cpu, counted in whole millicores: exactly 0.3, not 0.30000000000000004.
        assert (await ledger.used())["eu-only"].cpu == 0.3
        assert "short" in _refusal(await ledger.reserve("d-big", "eu", Demand(cpu=4.8, memory_mb=256, storage_gb=5)))
        assert (
            _placed_id(await ledger.reserve("d-fits", "eu", Demand(cpu=4.7, memory_mb=256, storage_gb=5))) == "eu-only"
        )


async def _clock(ledger: Ledger) -> int:
    async with ledger._engine.connect() as conn:
        tick = await conn.scalar(select(LedgerClock.tick))
    assert tick is not None
    return int(tick)


async def test_placements_asked_at_once_are_placed_in_one_transaction_in_their_order(
    any_engines: EngineFactory,
) -> None:
    async with _ledgers(any_engines, 1) as (ledger,):
        await ledger.reserve("d-first", "eu", ONE_OF_20)
        before = await _clock(ledger)
        asked = [f"d-{i:02d}" for i in range(30)]
        # d-00 twice, as a request redelivered while the first is still being placed.
        results = await asyncio.gather(*(ledger.reserve(name, "eu", ONE_OF_20) for name in [*asked, "d-00"]))
        # Room for 19 more: the first 19 asked get it, each counted for the ones after it.
        assert [name for name, result in zip(asked, results, strict=False) if isinstance(result, Placed)] == asked[:19]
        assert all("short" in _refusal(result) for result in results[19:30])
        assert results[30] == results[0]
        # One transaction for all of them: the clock moved once.
        assert await _clock(ledger) == before + 1
        assert await ledger.used() == {"eu-only": Demand(cpu=5.0, memory_mb=5120, storage_gb=100, vclusters=20)}
        assert ledger._cache is not None
        assert dict(ledger._cache) == dict(await ledger.used())


async def test_a_group_that_fails_is_not_counted(any_engines: EngineFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    async with _ledgers(any_engines, 1) as (ledger,):
        await ledger.reserve("d-first", "eu", ONE_OF_20)

        async def broken(*args: object) -> int:
            raise RuntimeError("the database went away")

        monkeypatch.setattr(ledger, "_count", broken)
        failed = await asyncio.gather(
            *(ledger.reserve(f"d-{i}", "eu", ONE_OF_20) for i in range(3)), return_exceptions=True
        )
        assert [str(result) for result in failed] == ["the database went away"] * 3
        monkeypatch.undo()
        # Nothing of the failed group is held, in the database or in the totals the ledger keeps.
        assert await ledger.used() == {"eu-only": ONE_OF_20}
        assert await ledger.holding("d-0") is None
        for index in range(19):
            assert isinstance(await ledger.reserve(f"d-{index}", "eu", ONE_OF_20), Placed)
        assert "short" in _refusal(await ledger.reserve("d-full", "eu", ONE_OF_20))


async def test_a_set_reservation_asked_with_placements_counts_for_the_ones_after_it(any_engines: EngineFactory) -> None:
    async with _ledgers(any_engines, 1) as (ledger,):
        await ledger.reserve("d-grows", "eu", ONE_OF_20)
        before = await _clock(ledger)
        ten = Demand(cpu=2.5, memory_mb=10 * 256, storage_gb=10 * 5)
        asked = [f"d-{i:02d}" for i in range(15)]
        # Asked in this order, all before the ledger's writer runs.
        growing = asyncio.create_task(ledger.set_reservation("d-grows", "eu-only", ten))
        placing = [asyncio.create_task(ledger.reserve(name, "eu", ONE_OF_20)) for name in asked]
        grown, results = await growing, await asyncio.gather(*placing)
        # It grew from one share to ten first: ten are left for the placements after it.
        assert isinstance(grown.placement, Placed)
        assert [name for name, result in zip(asked, results, strict=True) if isinstance(result, Placed)] == asked[:10]
        assert await ledger.holding("d-grows") == ("eu-only", ten)
        assert await _clock(ledger) == before + 1
        assert await ledger.used() == {"eu-only": Demand(cpu=5.0, memory_mb=5120, storage_gb=100, vclusters=11)}
        assert ledger._cache is not None
        assert dict(ledger._cache) == dict(await ledger.used())


async def test_lookups_asked_at_once_are_read_in_one_statement(any_engines: EngineFactory) -> None:
    async with _ledgers(any_engines, 1) as (ledger,):
        names = [f"d-{i:02d}" for i in range(12)]
        for name in names[:10]:
            await ledger.reserve(name, "eu", ONE_OF_20)
        statements: list[str] = []

        def seen(conn: object, cursor: object, statement: str, *args: object) -> None:
            statements.append(statement)

        event.listen(ledger._engine.sync_engine, "before_cursor_execute", seen)
        try:
            found = await asyncio.gather(*(ledger.holding(name) for name in names), ledger.location_of("d-03"))
        finally:
            event.remove(ledger._engine.sync_engine, "before_cursor_execute", seen)
        assert found == [*[("eu-only", ONE_OF_20)] * 10, None, None, "eu-only"]
        assert len([s for s in statements if "FROM scheduler_reservations" in s]) == 1
