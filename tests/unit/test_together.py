"""PostgreSQL statements joined into one (a lone create's inserts): each part's parameters numbered on."""

from __future__ import annotations

from services.deployments.store import _together


def test_the_parts_before_the_last_go_in_a_with_and_their_parameters_are_numbered_on() -> None:
    first = "INSERT INTO a (x, y) VALUES ($1::VARCHAR, $2)"
    second = (
        "INSERT INTO b ("
        + ", ".join(f"c{n}" for n in range(11))
        + ") VALUES ("
        + ", ".join(f"${n}" for n in range(1, 12))
        + ")"
    )
    third = "INSERT INTO c (z) VALUES ($1::JSON)"
    joined = _together((first, second, third))
    assert joined == (
        "WITH w0 AS (INSERT INTO a (x, y) VALUES ($1::VARCHAR, $2)), "
        "w1 AS (INSERT INTO b ("
        + ", ".join(f"c{n}" for n in range(11))
        + ") VALUES ("
        + ", ".join(f"${n}" for n in range(3, 14))
        + ")) INSERT INTO c (z) VALUES ($14::JSON)"
    )


def test_one_statement_stays_as_it_is() -> None:
    assert _together(("DELETE FROM outbox WHERE id IN ($1, $2)",)) == "DELETE FROM outbox WHERE id IN ($1, $2)"
