"""Records read by id (get): each asker answered as if read alone, the reads asked at one moment in one statement."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from services.deployments.store import DeploymentStore
from tests.support.counting_store import Counting
from tests.support.records import new_deployment

ALICE = str(uuid.uuid4())
BOB = str(uuid.uuid4())


async def test_reads_asked_at_once_are_one_statement_each_answered_as_alone(
    store: Counting, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = {}
    for name, owner in [("a", ALICE), ("b", ALICE), ("c", BOB)]:
        row, _ = await store.create(new_deployment(name, owner), lambda row, deployment: [])
        ids[name] = row.id
    statements: list[str] = []
    fetch = DeploymentStore._fetch_raw

    async def counted(self: DeploymentStore, statement: Any, values: Mapping[str, Any]) -> Sequence[Sequence[Any]]:
        statements.append(statement.sql)
        return await fetch(self, statement, values)

    monkeypatch.setattr(DeploymentStore, "_fetch_raw", counted)
    missing = str(uuid.uuid4())
    asked = [
        (ALICE, ids["a"]),
        (None, ids["c"]),
        (ALICE, ids["c"]),  # Bob's: not Alice's to read
        (ALICE, ids["a"]),  # the same record twice
        (BOB, ids["c"]),
        (None, missing),
        (ALICE, ids["b"]),
    ]
    found = await asyncio.gather(*(store.get(user, deployment_id) for user, deployment_id in asked))
    assert [row.name if row is not None else None for row in found] == ["a", "c", None, "a", "c", None, "b"]
    assert len(statements) == 1
    first, again = found[0], found[3]
    assert first is not None
    assert again is not None
    # Two askers of one record get rows of their own: changing one's spec leaves the other's.
    assert first.spec == again.spec
    assert first.spec is not again.spec
    # A lone read (a statement for one id) answers the same way.
    alone = await store.get(BOB, ids["c"])
    assert alone is not None
    assert (alone.id, alone.user_id) == (ids["c"], BOB)
    assert await store.get(BOB, ids["a"]) is None
    assert len(statements) == 3
