"""The lifecycle's rules for reported changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.deployments.lifecycle import OPERATIONS, STATUSES, allowed, early


@pytest.mark.parametrize(
    ("current", "new", "ok"),
    [
        ("pending", "provisioning", True),
        ("provisioning", "running", True),
        ("running", "provisioning", False),
        ("deleting", "provisioning", False),
        ("failed", "pending", True),
        ("running", "pending", False),
        ("pending", "running", False),
    ],
)
def test_allowed(current: str, new: str, ok: bool) -> None:
    assert allowed(current, new) is ok


def test_a_status_may_repeat_itself() -> None:
    assert all(allowed(status, status) for status in STATUSES)


def test_only_a_skip_ahead_on_the_way_forward_is_early() -> None:
    assert early("pending", "running")
    assert not early("running", "provisioning")
    assert not early("deleting", "running")
    assert not early("pending", "provisioning")


def test_the_lifecycle_table_in_the_api_docs_is_the_operations_table() -> None:
    """docs/api.md shows which operation each status allows; it must say what the code does."""
    docs = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    lines = docs[docs.index("| status | update |") :].splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    operations = header[1:]
    assert set(operations) == set(OPERATIONS)
    shown: dict[str, set[str]] = {operation: set() for operation in operations}
    statuses = set()
    for line in lines[2:]:
        if not line.startswith("| `"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        status = cells[0].strip("`")
        statuses.add(status)
        for operation, cell in zip(operations, cells[1:], strict=True):
            if cell.startswith("✓"):
                shown[operation].add(status)
    assert statuses == set(STATUSES)
    assert shown == {operation: set(allowed_from) for operation, allowed_from in OPERATIONS.items()}


def test_only_a_start_wakes_a_stopped_deployment_and_only_a_stop_puts_it_to_sleep() -> None:
    # A stop job's late progress report (running) must not undo the stop its last report made.
    assert not allowed("stopped", "running")
    assert not allowed("stopped", "running", "update")
    assert allowed("stopped", "running", "start")
    assert allowed("stopped", "provisioning", "start")
    assert not allowed("running", "stopped")
    assert allowed("running", "stopped", "stop")
    assert allowed("stopped", "stopped")
