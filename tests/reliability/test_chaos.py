"""The short chaos run that CI does: the long one is `python -m tests.chaos` (see README)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos import run_chaos

pytestmark = pytest.mark.slow


async def test_short_chaos_run_loses_and_duplicates_nothing(tmp_path: Path, database_url: str) -> None:
    result = await run_chaos(
        tmp_path / "chaos", deployments=30, kills=4, seconds=240, seed=7, database_url=database_url
    )
    assert result.kills == 4
    assert result.accepted == 30
    assert result.ok, "\n".join([result.line(), *result.details])
    assert result.running + result.failed == 30
