"""A deployment store that counts its commits that wrote outbox rows (the relay's wake-ups)."""

from __future__ import annotations

from typing import Any

from services.deployments.store import DeploymentStore


class Counting(DeploymentStore):
    """A store that counts its commits that wrote outbox rows (the relay's wake-ups)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.commits = 0

        def written() -> None:
            self.commits += 1

        self.outbox_written = written
