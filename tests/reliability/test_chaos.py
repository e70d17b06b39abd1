"""The short chaos run that CI does: the long one is `python -m tests.chaos` (see README)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos import run_chaos

pytestmark = pytest.mark.slow


async def test_short_chaos_run_with_day2_operations_loses_duplicates_and_mismatches_nothing(
    tmp_path: Path, database_url: str
) -> None:
    result = await run_chaos(
        tmp_path / "chaos",
        deployments=20,
        operations=30,
        kills=4,
        seconds=240,
        seed=7,
        database_url=database_url,
    )
    report = "\n".join([result.line(), *result.details])
    assert result.kills == 4
    assert result.accepted == 20
    assert result.operations.issued == 30
    # Most operations meet a deployment at rest that allows them; the rest are refused by design.
    assert result.operations.accepted > 0, report
    assert not result.operations.failures, report
    assert (result.lost, result.duplicated, result.mismatched) == (0, 0, 0), report
    assert result.watch_gaps == 0, report
    assert result.running + result.stopped + result.failed == result.accepted + result.copies, report
