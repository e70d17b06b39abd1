"""The lifecycle's rules for reported changes."""

from __future__ import annotations

import pytest

from services.deployments.lifecycle import STATUSES, allowed, early


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
