"""Latency summaries: nearest-rank percentiles over every sample, in milliseconds."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100); NaN for no values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summary(seconds: Sequence[float]) -> dict[str, Any]:
    """count, p50, p90, p99 and max of latencies given in seconds, reported in ms."""
    values = sorted(seconds)
    return {
        "count": len(values),
        "p50_ms": _ms(percentile(values, 50)),
        "p90_ms": _ms(percentile(values, 90)),
        "p99_ms": _ms(percentile(values, 99)),
        "max_ms": _ms(values[-1] if values else math.nan),
    }


def _ms(value: float) -> float | None:
    # JSON has no NaN: an empty sample is reported as null.
    return None if math.isnan(value) else round(value * 1000.0, 3)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return round(numerator / denominator, 3)
