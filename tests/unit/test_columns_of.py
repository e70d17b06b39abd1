"""convert.columns_of: an ORM row's columns as its attributes read them, new rows and stored ones alike."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import create_engine, update
from sqlalchemy.orm import Session

from services.deployments.convert import RECORD_COLUMNS, columns_of, observed_of, row_to_proto
from services.deployments.store import new_record
from services.deployments.tables import Base, DeploymentRow
from tests.support.records import new_deployment

COLUMNS = tuple(column.key for column in DeploymentRow.__table__.columns)


def _new() -> DeploymentRow:
    return new_record(new_deployment("web", str(uuid.uuid4())), datetime.now(UTC), id=str(uuid.uuid4()))


@pytest.fixture
def session() -> Iterator[Session]:
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with Session(engine, expire_on_commit=False) as opened:
        yield opened
    engine.dispose()


def test_a_new_row_reads_as_its_attributes_do_given_columns_and_the_rest() -> None:
    row = _new()
    assert any(name not in row.__dict__ for name in COLUMNS), "the test needs a column the row was not given"
    assert columns_of(row, COLUMNS) == {name: getattr(row, name) for name in COLUMNS}
    # Reading changes nothing the row holds: an unset column stays unset for the insert's defaults.
    assert "error_message" not in row.__dict__


def test_a_stored_row_loads_what_it_does_not_hold(session: Session) -> None:
    row = _new()
    session.add(row)
    session.commit()
    session.execute(update(DeploymentRow).values(phase="placing", error_message="boom"))
    session.expire(row, ["phase", "error_message"])
    assert "phase" not in row.__dict__
    read = columns_of(row, RECORD_COLUMNS)
    assert (read["phase"], read["error_message"]) == ("placing", "boom")
    assert observed_of(row)["phase"] == "placing"
    assert row_to_proto(row).phase == "placing"
