"""SQLAlchemy's aiosqlite driver, with each statement run in one trip to aiosqlite's thread.

aiosqlite runs the sqlite3 connection in a thread of its own; each call is queued to it and its
answer comes back through the event loop. SQLAlchemy's adapter makes three or four such calls per
statement (make a cursor, execute, fetch the rows, close the cursor), so a statement waits for as
many turns of the loop. On a busy process those turns, not SQLite, made up most of a write
transaction's time, and SQLite's one writer waited for them. Here the cursor is made, run, read and
closed in the thread by one call; what SQLAlchemy reads of it afterwards (description, row count,
last row id, the rows) is kept from that call.

A rollback with no transaction open (after a commit, or after reads only, since sqlite3 begins one
only before a write) has nothing to undo and is not sent. The pool rolls back every connection
handed back to it, so each read through the pool (a page, the relay's unsent rows) and each write
transaction saved a trip.
"""

from __future__ import annotations

import sqlite3
from collections import deque
from collections.abc import Sequence
from typing import Any

import aiosqlite
from sqlalchemy.connectors.asyncio import AsyncAdapt_dbapi_connection
from sqlalchemy.dialects.sqlite.aiosqlite import (
    AsyncAdapt_aiosqlite_connection,
    AsyncAdapt_aiosqlite_cursor,
    AsyncAdapt_aiosqlite_dbapi,
)
from sqlalchemy.util import EMPTY_DICT
from sqlalchemy.util.concurrency import await_


def _run(
    connection: aiosqlite.Connection, operation: str, parameters: Any, many: bool
) -> tuple[Any, list[Any] | None, int, int | None]:
    """In aiosqlite's thread: the statement run on a cursor of its own, read, and the cursor closed."""
    cursor = connection._conn.cursor()
    try:
        if many:
            cursor.executemany(operation, parameters)
        elif parameters is None:
            cursor.execute(operation)
        else:
            cursor.execute(operation, parameters)
        rows = cursor.fetchall() if cursor.description and not many else None
        return cursor.description, rows, cursor.rowcount, cursor.lastrowid
    finally:
        cursor.close()


class _OneTripCursor(AsyncAdapt_aiosqlite_cursor):
    __slots__ = ("_arraysize", "_description", "_lastrowid", "_rowcount")

    def __init__(self, adapt_connection: AsyncAdapt_dbapi_connection) -> None:
        # No aiosqlite cursor: the statement makes and closes its own in the thread.
        self._adapt_connection = adapt_connection
        self._connection = adapt_connection._connection
        self._soft_closed_memoized = EMPTY_DICT
        self._rows = deque()
        self._description: Any = None
        self._rowcount = -1
        self._lastrowid: int | None = None
        # What fetchmany() without a size takes (sqlite3's default).
        self._arraysize = 1

    @property
    def description(self) -> Any:
        return self._description

    @property
    def rowcount(self) -> int:
        return self._rowcount

    @property
    def lastrowid(self) -> Any:
        return self._lastrowid

    @property
    def arraysize(self) -> int:
        return self._arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._arraysize = value

    async def _async_soft_close(self) -> None:
        return None

    def close(self) -> None:
        self._rows.clear()

    def execute(self, operation: Any, parameters: Any = None) -> Any:
        return self._trip(operation, parameters, many=False)

    def executemany(self, operation: Any, seq_of_parameters: Any) -> Any:
        return self._trip(operation, seq_of_parameters, many=True)

    def _trip(self, operation: Any, parameters: Any, *, many: bool) -> None:
        try:
            self._description, rows, self._rowcount, self._lastrowid = await_(self._run(operation, parameters, many))
        except Exception as error:
            self._adapt_connection._handle_exception(error)
        self._rows = deque(rows or ())

    async def _run(self, operation: Any, parameters: Any, many: bool) -> tuple[Any, list[Any] | None, int, int | None]:
        async with self._adapt_connection._execute_mutex:
            return await self._connection._execute(_run, self._connection, operation, parameters, many)  # type: ignore[no-any-return]


class _OneTripConnection(AsyncAdapt_aiosqlite_connection):
    __slots__ = ()

    _cursor_cls = _OneTripCursor

    def rollback(self) -> None:
        # The flag is SQLite's own (sqlite3_get_autocommit), read outside the thread, which runs nothing of
        # this connection's meanwhile: a connection is rolled back by its one user, between its statements.
        raw = self._connection._connection
        if raw is not None and not raw.in_transaction:
            return
        super().rollback()


class OneTripDbapi(AsyncAdapt_aiosqlite_dbapi):
    """The DBAPI module an aiosqlite engine is made with (`create_async_engine(url, module=...)`)."""

    def connect(self, *arg: Any, **kw: Any) -> _OneTripConnection:
        adapted = super().connect(*arg, **kw)
        return _OneTripConnection(self, adapted._connection)


def dbapi() -> OneTripDbapi:
    return OneTripDbapi(aiosqlite, sqlite3)


def _run_committed(connection: aiosqlite.Connection, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
    """In aiosqlite's thread: each statement run for each of its rows, then the commit (or the rollback,
    when one fails)."""
    raw = connection._conn
    cursor = raw.cursor()
    try:
        for operation, rows in statements:
            cursor.executemany(operation, rows)
        raw.commit()
    except BaseException:
        raw.rollback()
        raise
    finally:
        cursor.close()


async def execute_committed(connection: aiosqlite.Connection, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
    """Write statements, each with its rows of parameters, in one transaction committed in one trip to
    aiosqlite's thread."""
    await connection._execute(_run_committed, connection, statements)  # type: ignore[no-untyped-call]
