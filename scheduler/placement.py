"""Placement: choose the host cluster (location) for a deployment's demand, or say why none fits."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeAlias

import numpy as np
import numpy.typing as npt

from apphosting import resources
from apphosting.locations import LocationConfig
from apphosting.v1 import deployments_pb2

# Reservations are summed in floating point (0.1 + 0.1 + ... drifts); without slack a location
# that has exactly the room asked for could be refused by a rounding error.
_CPU_SLACK = 1e-9

# How many location ids a refusal lists before it abbreviates.
_MAX_IDS_IN_MESSAGE = 5

# How many candidates an explanation lists; `more` counts the rest.
MAX_CANDIDATES = 20

# From this many healthy locations in a region on, place() scores them all at once with numpy over a
# Usage's arrays; below it, numpy's fixed cost per call is more than the plain loop's.
VECTOR_FROM = 32

_Floats: TypeAlias = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Demand:
    """Resources a deployment takes from a location (or, summed, what a location has given away)."""

    cpu: float
    memory_mb: int
    storage_gb: int
    vclusters: int = 1

    def __post_init__(self) -> None:
        # A negative demand would silently free capacity in the ledger; NaN would fit everywhere.
        if not (self.cpu >= 0 and self.memory_mb >= 0 and self.storage_gb >= 0 and self.vclusters >= 0):
            raise ValueError(f"a demand cannot be negative: {self}")
        # An int cpu (Demand(cpu=2, ...)) would make the placement loop mix int and float
        # arithmetic, which is measurably slower.
        object.__setattr__(self, "cpu", float(self.cpu))


NOTHING = Demand(cpu=0.0, memory_mb=0, storage_gb=0, vclusters=0)


def demand_of(deployment: deployments_pb2.Deployment) -> Demand:
    """What a deployment needs: per-replica cpu and memory times replicas, its storage plus volumes.

    A stopped deployment runs no pods but keeps its volumes and its (sleeping) vCluster; an adopted
    one lives in a namespace of the host cluster and takes no vCluster slot.
    """
    # The kernel's demand, so placement reserves what the quota counts and the pods request.
    demand = resources.demand_of(deployment)
    stopped = deployment.status == deployments_pb2.DEPLOYMENT_STATUS_STOPPED
    return Demand(
        cpu=0.0 if stopped else demand.total_cpu_millis / 1000,
        memory_mb=0 if stopped else demand.total_memory_mb,
        storage_gb=demand.storage_gb,
        vclusters=0 if deployment.is_adopted else 1,
    )


@dataclass(frozen=True, slots=True)
class Placed:
    """The location chosen for a demand."""

    location: LocationConfig


@dataclass(frozen=True, slots=True)
class Refused:
    """No location can take the demand; the message tells a user why."""

    message: str


Placement: TypeAlias = Placed | Refused


@dataclass(frozen=True, slots=True)
class Explained:
    """A placement and the explanation of it that users see (every candidate and why it lost)."""

    placement: Placement
    explanation: deployments_pb2.PlacementExplanation


class _Slot(NamedTuple):
    # A location flattened for the hot loop: walking location.capacity.cpu for every location
    # costs more than the placement arithmetic itself.
    id: str
    cpu: float
    memory_mb: int
    storage_gb: int
    vclusters: int
    headroom_bonus: float  # 1 + weight: the score is headroom_bonus - worst utilisation
    location: LocationConfig


@dataclass(frozen=True, slots=True)
class _Region:
    # Healthy locations sorted by id, so that the first best score found wins ties deterministically.
    healthy: tuple[_Slot, ...]
    unhealthy_ids: tuple[str, ...]
    # Every location of the region, healthy or not, sorted by id, and the same as columns for the
    # vector path (rows: cpu, memory, storage, vCluster slots): capacity, the largest use that still
    # fits (cpu with its slack), 1 + weight, and which are healthy.
    members: tuple[_Slot, ...]
    capacity: _Floats
    limits: _Floats
    bonus: _Floats
    healthy_mask: npt.NDArray[np.bool_]


def _region(locations: Sequence[LocationConfig]) -> _Region:
    members = tuple(sorted((_slot(loc) for loc in locations), key=lambda s: s.id))
    capacity = np.array([[s.cpu, s.memory_mb, s.storage_gb, s.vclusters] for s in members], dtype=np.float64)
    capacity = capacity.reshape(len(members), 4).T.copy()
    limits = capacity.copy()
    limits[0] += _CPU_SLACK
    return _Region(
        healthy=tuple(slot for slot in members if slot.location.healthy),
        unhealthy_ids=tuple(slot.id for slot in members if not slot.location.healthy),
        members=members,
        capacity=capacity,
        limits=limits,
        bonus=np.array([s.headroom_bonus for s in members], dtype=np.float64),
        healthy_mask=np.array([s.location.healthy for s in members], dtype=np.bool_),
    )


class Usage(Mapping[str, Demand]):
    """Capacity held per location id, kept beside the placer's index as arrays that place() scores at once.

    A Mapping like any other `used` (locations holding nothing are absent), built for one Placer and
    updated in place by set() and add(): one location's change costs the same whatever the size of the
    fleet or the number of deployments holding capacity.
    """

    def __init__(self, placer: Placer, held: Mapping[str, Demand] | Iterable[tuple[str, Demand]] = ()) -> None:
        self.placer = placer
        self._held: dict[str, Demand] = {}
        # Per region, the use of each location (same rows and columns as _Region.capacity).
        self._arrays = {name: np.zeros_like(region.capacity) for name, region in placer._regions.items()}
        for location_id, demand in held.items() if isinstance(held, Mapping) else held:
            self.set(location_id, demand)

    def set(self, location_id: str, demand: Demand) -> None:
        """What the location holds now, in all."""
        self._held[location_id] = demand
        found = self.placer._columns.get(location_id)
        if found is not None:
            region, column = found
            self._arrays[region][:, column] = (demand.cpu, demand.memory_mb, demand.storage_gb, demand.vclusters)

    def add(self, location_id: str, change: Demand, sign: int = 1) -> None:
        """Adds (sign 1) or takes away (sign -1) one reservation's demand; never below nothing."""
        taken = self._held.get(location_id, NOTHING)
        self.set(
            location_id,
            Demand(
                cpu=max(taken.cpu + sign * change.cpu, 0.0),
                memory_mb=max(taken.memory_mb + sign * change.memory_mb, 0),
                storage_gb=max(taken.storage_gb + sign * change.storage_gb, 0),
                vclusters=max(taken.vclusters + sign * change.vclusters, 0),
            ),
        )

    def region_array(self, geographic_region: str) -> _Floats:
        return self._arrays[geographic_region]

    def __getitem__(self, location_id: str) -> Demand:
        return self._held[location_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._held)

    def __len__(self) -> int:
        return len(self._held)


class Placer:
    """Places demands on a fixed set of locations; the per-region index is built once, up front."""

    def __init__(self, locations: Sequence[LocationConfig]) -> None:
        by_region: dict[str, list[LocationConfig]] = {}
        for location in locations:
            by_region.setdefault(location.geographic_region, []).append(location)
        self._by_id = {location.id: location for location in locations}
        self._members = {
            region: tuple(sorted(members, key=lambda loc: loc.id)) for region, members in by_region.items()
        }
        self._regions = {region: _region(members) for region, members in by_region.items()}
        # Where each location's column is in its region's arrays.
        self._columns = {
            slot.id: (name, column)
            for name, region in self._regions.items()
            for column, slot in enumerate(region.members)
        }
        self._known = ", ".join(sorted(self._regions))

    def usage(self, held: Mapping[str, Demand] | Iterable[tuple[str, Demand]] = ()) -> Usage:
        """An empty Usage for this placer's locations, or one holding `held`."""
        return Usage(self, held)

    def place(self, used: Mapping[str, Demand], geographic_region: str, demand: Demand) -> Placement:
        """The best healthy location of the region with room for the demand, or why there is none.

        Score (higher wins): ``1 - max(utilisation of cpu, memory, storage, vCluster slots after
        placing) + weight``. Taking the *worst* dimension rather than an average spreads load so
        that no single resource of a location saturates first: a location whose memory is 90 % used
        is nearly full even if its cpu is idle, because the next memory-heavy app will not fit
        there. Spreading also keeps headroom everywhere for apps that grow in place. The operator's
        ``weight`` is in the same unit as the headroom, so 0.1 prefers a location as if it had 10 %
        more room left, and a large negative weight drains it. Equal scores go to the smallest
        location id so that the same inputs always give the same answer.
        """
        region = self._regions.get(geographic_region)
        if region is None:
            return Refused(f"no location in geographic region {geographic_region!r} (known: {self._known})")
        if not region.healthy:
            return Refused(
                f"no healthy location in geographic region {geographic_region!r}: "
                f"all {len(region.unhealthy_ids)} are unhealthy ({_ids(region.unhealthy_ids)})"
            )

        if isinstance(used, Usage) and used.placer is self and len(region.healthy) >= VECTOR_FROM:
            return self._place_vector(used, geographic_region, region, demand)
        return self._place_loop(used, geographic_region, region, demand)

    def _place_vector(self, used: Usage, geographic_region: str, region: _Region, demand: Demand) -> Placement:
        """place() over the region's arrays at once: the same arithmetic, so the same choice as the loop.

        Every operation is one IEEE double operation per element, as in the loop (integers are exact
        in a double up to 2**53), and argmax and argmin return the first of equal values, which is
        the smallest id, as the loop's strict comparisons do.
        """
        worst, fits, score = _scores(used, geographic_region, region, demand)
        # The loop only takes a healthy location's score above -inf (never NaN, never -inf).
        eligible = fits & region.healthy_mask & (score > -math.inf)
        if eligible.any():
            return Placed(region.members[int(np.argmax(np.where(eligible, score, -math.inf)))].location)
        # The loop's closest: the first smallest worst among the healthy that do not fit (NaN never
        # wins), or the first healthy when none is below infinity.
        misfits = np.where(fits | ~region.healthy_mask | np.isnan(worst), math.inf, worst)
        column = int(np.argmin(misfits))
        closest = region.members[column] if misfits[column] < math.inf else region.healthy[0]
        return Refused(_no_room(geographic_region, region, closest, used, demand))

    def _place_loop(
        self, used: Mapping[str, Demand], geographic_region: str, region: _Region, demand: Demand
    ) -> Placement:
        """The reference rule, one location at a time: plain locals and no allocations."""
        d_cpu = demand.cpu
        d_mem = demand.memory_mb
        d_sto = demand.storage_gb
        d_vc = demand.vclusters
        used_get = used.get
        best: _Slot | None = None
        best_score = -math.inf
        # Kept for the refusal message: the location that would be least full after placing.
        closest = region.healthy[0]
        closest_worst = math.inf
        for slot in region.healthy:
            loc_id, c_cpu, c_mem, c_sto, c_vc, bonus, _ = slot
            taken = used_get(loc_id)
            if taken is None:
                u_cpu, u_mem, u_sto, u_vc = d_cpu, d_mem, d_sto, d_vc
            else:
                u_cpu = taken.cpu + d_cpu
                u_mem = taken.memory_mb + d_mem
                u_sto = taken.storage_gb + d_sto
                u_vc = taken.vclusters + d_vc
            worst = u_cpu / c_cpu
            ratio = u_mem / c_mem
            if ratio > worst:
                worst = ratio
            ratio = u_sto / c_sto
            if ratio > worst:
                worst = ratio
            ratio = u_vc / c_vc
            if ratio > worst:
                worst = ratio
            # Exact comparisons for the integer dimensions rather than worst <= 1: a ratio can
            # round to 1.0 on a huge capacity.
            if u_cpu <= c_cpu + _CPU_SLACK and u_mem <= c_mem and u_sto <= c_sto and u_vc <= c_vc:
                score = bonus - worst
                if score > best_score:
                    best, best_score = slot, score
            elif worst < closest_worst:
                closest, closest_worst = slot, worst
        if best is not None:
            return Placed(best.location)
        return Refused(_no_room(geographic_region, region, closest, used, demand))

    def explain(
        self, used: Mapping[str, Demand], geographic_region: str, demand: Demand, pinned: str | None = None
    ) -> Explained:
        """The placement with every candidate's score and, for those not chosen, why.

        Without `pinned` the choice is Placer.place's (same score, same tie rule); with it only
        that location is considered, and the region's others are listed as not pinned. A separate,
        slower pass than place(): it builds a message per location listed, so it serves real
        placements and explanations, not the hot loop. Given a Usage of this placer, an unpinned
        explanation scores the region at once and builds messages only for the candidates it lists.
        """
        region = self._regions.get(geographic_region)
        if (
            pinned is None
            and region is not None
            and isinstance(used, Usage)
            and used.placer is self
            and len(region.members) >= VECTOR_FROM
        ):
            return self._explain_vector(used, geographic_region, region, demand)
        return self._explain_loop(used, geographic_region, demand, pinned)

    def _explain_vector(self, used: Usage, geographic_region: str, region: _Region, demand: Demand) -> Explained:
        """explain() without a pin: the same rows, choice and order as the loop, at numpy's speed."""
        members = region.members
        _, fits, score = _scores(used, geographic_region, region, demand)
        eligible = fits & region.healthy_mask
        chosen = -1
        if eligible.any():
            # The loop's best: the first eligible, replaced only by a strictly higher score.
            masked = np.where(eligible, score, -math.inf)
            chosen = int(np.argmax(masked))
            if not eligible[chosen]:
                chosen = int(np.argmax(eligible))
        # Listed: the chosen first, then by score (highest first) and id. The best MAX_CANDIDATES
        # all score at least the MAX_CANDIDATES-th highest score, so only those are sorted.
        count = len(members)
        if count > MAX_CANDIDATES:
            floor = np.partition(score, count - MAX_CANDIDATES)[count - MAX_CANDIDATES]
            columns = np.flatnonzero(score >= floor)
        else:
            columns = np.arange(count)
        if chosen >= 0 and chosen not in columns:
            columns = np.append(columns, chosen)
        order = columns[np.lexsort((columns, -score[columns], columns != chosen))][:MAX_CANDIDATES]
        rows = []
        for column in order.tolist():
            location = members[column].location
            assessed, short = _assess(location, used.get(location.id), demand)
            row = deployments_pb2.PlacementCandidate(location_id=location.id, score=assessed, weight=location.weight)
            if column == chosen:
                row.chosen = True
            elif not location.healthy:
                row.reason = "unhealthy"
            elif short:
                row.reason = "short of " + ", ".join(short)
            else:
                row.reason = "lower score"
            rows.append(row)
        explanation = deployments_pb2.PlacementExplanation(candidates=rows, more=max(count - MAX_CANDIDATES, 0))
        if chosen >= 0:
            location = members[chosen].location
            explanation.chosen_location_id = location.id
            return Explained(Placed(location), explanation)
        refusal = self.place(used, geographic_region, demand)
        assert isinstance(refusal, Refused), "explain and place disagree"
        explanation.refusal = refusal.message
        return Explained(refusal, explanation)

    def _explain_loop(
        self, used: Mapping[str, Demand], geographic_region: str, demand: Demand, pinned: str | None
    ) -> Explained:
        """explain() one location at a time: the reference, and the pinned case."""
        if pinned is not None:
            target = self._by_id.get(pinned)
            considered: tuple[LocationConfig, ...] = () if target is None else (target,)
            others = tuple(loc for loc in self._members.get(geographic_region, ()) if loc.id != pinned)
        else:
            considered = self._members.get(geographic_region, ())
            others = ()
        rows: list[deployments_pb2.PlacementCandidate] = []
        best: deployments_pb2.PlacementCandidate | None = None
        shortfalls: list[str] = []
        for location in considered:
            score, short = _assess(location, used.get(location.id), demand)
            row = deployments_pb2.PlacementCandidate(location_id=location.id, score=score, weight=location.weight)
            if not location.healthy:
                row.reason = "unhealthy"
            elif short:
                row.reason = "short of " + ", ".join(short)
                shortfalls = short
            elif best is None or score > best.score:
                # Members are sorted by id, so the first of equal scores wins, as in place().
                best = row
            rows.append(row)
        for location in others:
            score, _ = _assess(location, used.get(location.id), demand)
            rows.append(
                deployments_pb2.PlacementCandidate(
                    location_id=location.id, score=score, weight=location.weight, reason="not the pinned location"
                )
            )
        for row in rows:
            if row is best:
                row.chosen = True
            elif not row.reason:
                row.reason = "lower score"
        rows.sort(key=lambda row: (not row.chosen, -row.score, row.location_id))
        explanation = deployments_pb2.PlacementExplanation(
            candidates=rows[:MAX_CANDIDATES], more=max(len(rows) - MAX_CANDIDATES, 0)
        )
        if best is not None:
            explanation.chosen_location_id = best.location_id
            return Explained(Placed(self._by_id[best.location_id]), explanation)
        if pinned is None:
            refusal = self.place(used, geographic_region, demand)
            assert isinstance(refusal, Refused), "explain and place disagree"
            message = refusal.message
        elif not considered:
            message = f"unknown location {pinned!r}"
        elif not considered[0].healthy:
            message = f"location {pinned} is unhealthy"
        else:
            message = f"location {pinned} is short of {', '.join(shortfalls)}"
        explanation.refusal = message
        return Explained(Refused(message), explanation)


def _scores(
    used: Usage, geographic_region: str, region: _Region, demand: Demand
) -> tuple[_Floats, npt.NDArray[np.bool_], _Floats]:
    """Per member of the region: the worst utilisation after placing, whether it fits, and the score."""
    after = used.region_array(geographic_region) + np.array(
        [[demand.cpu], [demand.memory_mb], [demand.storage_gb], [demand.vclusters]], dtype=np.float64
    )
    worst: _Floats = (after / region.capacity).max(axis=0)
    fits: npt.NDArray[np.bool_] = np.asarray((after <= region.limits).all(axis=0))
    return worst, fits, region.bonus - worst


def _assess(location: LocationConfig, taken: Demand | None, demand: Demand) -> tuple[float, list[str]]:
    """The score place() gives the location for the demand, and each dimension it is short in."""
    cap = location.capacity
    if taken is None:
        taken = NOTHING
    # The same arithmetic, in the same order, as place(), so that equal inputs give equal scores.
    u_cpu = taken.cpu + demand.cpu
    u_mem = taken.memory_mb + demand.memory_mb
    u_sto = taken.storage_gb + demand.storage_gb
    u_vc = taken.vclusters + demand.vclusters
    worst = max(u_cpu / cap.cpu, u_mem / cap.memory_mb, u_sto / cap.storage_gb, u_vc / cap.vclusters)
    short = []
    if u_cpu > cap.cpu + _CPU_SLACK:
        short.append(f"cpu by {_cpu(u_cpu - cap.cpu)}")
    if u_mem > cap.memory_mb:
        short.append(f"memory by {_mib(u_mem - cap.memory_mb)}")
    if u_sto > cap.storage_gb:
        short.append(f"storage by {_gib(u_sto - cap.storage_gb)}")
    if u_vc > cap.vclusters:
        short.append(f"vCluster slots by {u_vc - cap.vclusters}")
    return 1.0 + location.weight - worst, short


def _slot(location: LocationConfig) -> _Slot:
    cap = location.capacity
    return _Slot(location.id, cap.cpu, cap.memory_mb, cap.storage_gb, cap.vclusters, 1.0 + location.weight, location)


def _ids(ids: Sequence[str]) -> str:
    if len(ids) <= _MAX_IDS_IN_MESSAGE:
        return ", ".join(ids)
    return ", ".join(ids[:_MAX_IDS_IN_MESSAGE]) + f" and {len(ids) - _MAX_IDS_IN_MESSAGE} more"


def _no_room(
    geographic_region: str, region: _Region, closest: _Slot, used: Mapping[str, Demand], demand: Demand
) -> str:
    """Names the location that came closest and every dimension it is short in."""
    taken = used.get(closest.id, NOTHING)
    rows = (
        ("cpu", _cpu, demand.cpu, closest.cpu - taken.cpu, _CPU_SLACK),
        ("memory", _mib, demand.memory_mb, closest.memory_mb - taken.memory_mb, 0),
        ("storage", _gib, demand.storage_gb, closest.storage_gb - taken.storage_gb, 0),
        ("vCluster slots", str, demand.vclusters, closest.vclusters - taken.vclusters, 0),
    )
    parts = []
    for name, fmt, wanted, free, slack in rows:
        # A location can be over capacity (an operator lowered it); it has nothing free then.
        free = max(free, 0)
        short = wanted - free
        parts.append(f"{name} {fmt(free)} (short {fmt(short)})" if short > slack else f"{name} {fmt(free)}")
    message = (
        f"no location in {geographic_region!r} has room for cpu {_cpu(demand.cpu)}, "
        f"memory {_mib(demand.memory_mb)}, storage {_gib(demand.storage_gb)}, "
        f"vCluster slots {demand.vclusters}: best free is {closest.id} with {', '.join(parts)}"
    )
    if region.unhealthy_ids:
        message += f"; unhealthy, not considered: {_ids(region.unhealthy_ids)}"
    return message


def _cpu(value: float) -> str:
    # Floats summed from many reservations carry noise (1.9999999999999998); people read 2.0.
    return str(round(float(value), 3))


def _mib(value: float) -> str:
    return f"{value} MiB"


def _gib(value: float) -> str:
    return f"{value} GiB"


# place() is called with the same locations tuple over and over; indexing it anew each time would
# cost more than placing. Only tuples are cached: they (and the frozen configs in them) cannot
# change behind the cache's back, and holding the tuple keeps its id from being reused.
_cached: tuple[tuple[LocationConfig, ...], Placer] | None = None


def place(
    locations: Sequence[LocationConfig], used: Mapping[str, Demand], geographic_region: str, demand: Demand
) -> Placement:
    """Chooses a location for the demand; see Placer.place for the rules and the score."""
    global _cached
    if isinstance(locations, tuple):
        if _cached is None or _cached[0] is not locations:
            _cached = (locations, Placer(locations))
        return _cached[1].place(used, geographic_region, demand)
    return Placer(locations).place(used, geographic_region, demand)
