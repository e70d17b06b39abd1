"""The deployment records: written in transactions with their event log and the outbox."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import itertools
import json
import re
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache, partial
from typing import Any, TypeVar, cast

import asyncpg
import pydantic_core
from sqlalchemy import (
    JSON,
    BigInteger,
    Dialect,
    Integer,
    Select,
    Table,
    Text,
    and_,
    bindparam,
    case,
    column,
    delete,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.sql.schema import ScalarElementColumnDefault

from apphosting import secrets, sqlite_driver, tracing
from apphosting.batching import Batcher
from apphosting.db import UTCDateTime
from apphosting.v1 import deployments_pb2 as pb
from services.deployments import quotas as quota_rules
from services.deployments import secret_env
from services.deployments.convert import (
    OBSERVED,
    RECORD_COLUMNS,
    changed,
    columns_of,
    fold,
    observed_of,
    row_to_proto,
)
from services.deployments.errors import ServiceError
from services.deployments.lifecycle import TERMINAL, allowed, early
from services.deployments.tables import (
    EVENT_HISTORY,
    HEAVY_HISTORY,
    HISTORY_BYTES,
    LONG_HISTORY,
    Base,
    DeploymentRow,
    EventRow,
    OutboxRow,
    ReleaseRow,
)

# First key of the PostgreSQL advisory locks that serialise one user's quota-checked creates
# (arbitrary; the scheduler's ledger uses a single 64-bit key, which cannot collide with a pair).
_QUOTA_LOCK_SPACE = 0x71756F74  # "quot"

# What a row costs besides its variable-length fields (keys, ids, times, indexes): a round figure,
# so that many small rows count too.
_RECORD_OVERHEAD = 512
_EVENT_OVERHEAD = 128
# What a listed page reads: the keyset and the columns its Deployments are made of.
_PAGE_COLUMNS = tuple(cast(Table, DeploymentRow.__table__).c[name] for name in ("seq", *RECORD_COLUMNS))
# What the two drivers raise for a failed statement (OSError, a lost socket, passes as it is).
_DRIVER_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, asyncpg.PostgresError, asyncpg.InterfaceError)


def _driver_error(sql: str, args: Any, failure: Exception) -> DBAPIError:
    """What SQLAlchemy would have raised for a driver's failure: IntegrityError for a broken constraint
    (a taken name), OperationalError otherwise."""
    if isinstance(failure, sqlite3.IntegrityError | asyncpg.IntegrityConstraintViolationError):
        return IntegrityError(sql, args, failure)
    return OperationalError(sql, args, failure)


def _json_text(text: str) -> Any:
    """A JSON column's text as the standard library reads it, through pydantic's parser (about twice as fast)."""
    try:
        return pydantic_core.from_json(text)
    except ValueError:
        # What only the standard library reads: a lone surrogate escape.
        return json.loads(text)


def _sqlite_moment(text: str) -> datetime:
    """A UTCDateTime as SQLite stores it ('2026-03-01 12:30:15.123456', UTC), read in C instead of by a regex.

    The offset is parsed with it: `replace(tzinfo=UTC)` on the parsed moment costs five times the parse.
    """
    return datetime.fromisoformat(text + "+00:00")


def _column_decoder(column: Any, dialect: Dialect) -> Callable[[Any], Any] | None:
    """How a driver statement's column is read from what the driver gives; None: as given."""
    if isinstance(column.type, JSON):
        # Selected as text on either database (asyncpg would decode json with json.loads).
        return _json_text
    if isinstance(column.type, UTCDateTime) and dialect.name == "sqlite":
        return _sqlite_moment
    return cast(Callable[[Any], Any] | None, column.type.dialect_impl(dialect).result_processor(dialect, None))


@dataclass(frozen=True)
class _DriverStatement:
    """A Core query compiled once, to run on the driver's own connection: its SQL, the order of its
    parameters and its columns' decoders."""

    sql: str
    binds: tuple[str, ...]
    # Parameters the dialect added with their values (SQLite's OFFSET 0 after a LIMIT).
    constants: dict[str, Any]
    names: tuple[str, ...]
    # The columns that need one, by name: the others are what the driver gives.
    decoders: tuple[tuple[str, Callable[[Any], Any]], ...]

    @classmethod
    def compile(
        cls, dialect: Dialect, columns: Sequence[Any], shape: Callable[[Select[Any]], Select[Any]]
    ) -> _DriverStatement:
        """`columns` selected (JSON ones as text), the query then shaped by `shape` (filters, order, limit)."""
        query = shape(
            select(
                *(
                    column.cast(Text).label(column.name) if isinstance(column.type, JSON) else column
                    for column in columns
                )
            )
        )
        compiled = query.compile(dialect=dialect)
        decoders = tuple(
            (column.name, decode) for column in columns if (decode := _column_decoder(column, dialect)) is not None
        )
        return cls(
            compiled.string,
            tuple(compiled.positiontup or ()),
            compiled.params,
            tuple(column.name for column in columns),
            decoders,
        )

    def args(self, values: Mapping[str, Any]) -> list[Any]:
        return [values[name] if name in values else self.constants[name] for name in self.binds]

    def record(self, row: Sequence[Any]) -> dict[str, Any]:
        values = dict(zip(self.names, row, strict=True))
        for name, decode in self.decoders:
            value = values[name]
            if value is not None:
                values[name] = decode(value)
        return values


@lru_cache(maxsize=512)
def _page_statement(
    dialect: Dialect, user: bool, statuses: int, region: bool, show_deleted: bool, before: bool
) -> _DriverStatement:
    """A page's statement for one combination of filters."""

    def shape(query: Select[Any]) -> Select[Any]:
        if not show_deleted:
            query = query.where(DeploymentRow.deleted_at.is_(None))
        if user:
            query = query.where(DeploymentRow.user_id == bindparam("user_id"))
        if statuses:
            query = query.where(DeploymentRow.status.in_([bindparam(f"status_{i}") for i in range(statuses)]))
        if region:
            query = query.where(DeploymentRow.geographic_region == bindparam("region"))
        if before:
            query = query.where(DeploymentRow.seq < bindparam("before"))
        return query.order_by(DeploymentRow.seq.desc()).limit(bindparam("limit", type_=Integer))

    return _DriverStatement.compile(dialect, _PAGE_COLUMNS, shape)


@lru_cache(maxsize=64)
def _records_statement(dialect: Dialect, count: int) -> _DriverStatement:
    """`count` records by id (binds id_0 ... id_<count-1>)."""

    def shape(query: Select[Any]) -> Select[Any]:
        return query.where(DeploymentRow.id.in_([bindparam(f"id_{index}") for index in range(count)]))

    return _DriverStatement.compile(dialect, tuple(_RECORDS.columns), shape)


@lru_cache(maxsize=64)
def _stored_events_statement(dialect: Dialect, count: int) -> _DriverStatement:
    """Which of `count` event ids are stored (binds id_0 ... id_<count-1>)."""

    def shape(query: Select[Any]) -> Select[Any]:
        return query.where(EventRow.event_id.in_([bindparam(f"id_{index}") for index in range(count)]))

    return _DriverStatement.compile(dialect, (cast(Table, EventRow.__table__).c.event_id,), shape)


@lru_cache(maxsize=64)
def _phase_events_statement(dialect: Dialect, count: int, phases: tuple[str, ...]) -> _DriverStatement:
    """The events of `count` deployments (binds id_0 ... id_<count-1>) in these phases: deployment, phase,
    revision and time."""
    events = cast(Table, EventRow.__table__)

    def shape(query: Select[Any]) -> Select[Any]:
        return query.where(
            events.c.deployment_id.in_([bindparam(f"id_{index}") for index in range(count)]),
            events.c.phase.in_([bindparam(f"phase_{index}", phase) for index, phase in enumerate(phases)]),
        )

    columns = (events.c.deployment_id, events.c.phase, events.c.revision, events.c.time)
    return _DriverStatement.compile(dialect, columns, shape)


_ByKeyStatement = Callable[[Dialect, int], _DriverStatement]


def _by_keys(
    statement: _ByKeyStatement, dialect: Dialect, keys: Sequence[str]
) -> tuple[_DriverStatement, dict[str, str]]:
    """A by-key statement (`_records_statement`, `_stored_events_statement`) for these keys, compiled once
    per padded count of keys, and the values of its binds."""
    padded = _padded(keys)
    return statement(dialect, len(padded)), {f"id_{index}": key for index, key in enumerate(padded)}


async def _fetch_in(
    connection: AsyncConnection, statement: _ByKeyStatement, keys: Sequence[str]
) -> list[dict[str, Any]]:
    """The rows of a by-key statement for these keys, read in the connection's transaction and decoded:
    neither the query nor its IN list is built again per call."""
    compiled, values = _by_keys(statement, connection.dialect, keys)
    args = compiled.args(values)
    return [compiled.record(row) for row in await connection.exec_driver_sql(compiled.sql, tuple(args))]


_OUTBOX = cast(Table, OutboxRow.__table__)


def _padded(ids: Sequence[str]) -> list[str]:
    """The ids padded to a power of two (with the first), so that a few statements serve every count."""
    size = 1 << (len(ids) - 1).bit_length()
    return [*ids, *[ids[0]] * (size - len(ids))]


@lru_cache(maxsize=64)
def _together(statements: tuple[str, ...]) -> str:
    """PostgreSQL's statements (numbered parameters, each from $1) as one: all but the last in a WITH, their
    parameters numbered on after those before them. One statement is atomic and sees one snapshot: its
    parts must not read what the others write (foreign keys are checked when the whole of it has run)."""
    parts: list[str] = []
    offset = 0
    for sql in statements:
        numbers = [int(found) for found in _PARAMETER.findall(sql)]
        parts.append(_PARAMETER.sub(partial(_shifted, by=offset), sql))
        offset += max(numbers, default=0)
    *first, last = parts
    if not first:
        return last
    return "WITH " + ", ".join(f"w{index} AS ({sql})" for index, sql in enumerate(first)) + " " + last


# A numbered parameter of PostgreSQL's ($1).
_PARAMETER = re.compile(r"\$(\d+)")


def _shifted(found: re.Match[str], by: int) -> str:
    return f"${int(found.group(1)) + by}"


@lru_cache(maxsize=64)
def _forget_statement(dialect: Dialect, count: int) -> str:
    """The SQL that deletes `count` outbox rows by id, its parameters in order."""
    ids: list[Any] = [bindparam(f"id_{index}") for index in range(count)]
    return delete(_OUTBOX).where(_OUTBOX.c.id.in_(ids)).compile(dialect=dialect).string


@dataclass(frozen=True)
class Unsent:
    """An outbox row as the relay sends it."""

    id: str
    subject: str
    payload: bytes
    headers: dict[str, str] | None


def now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Outgoing:
    """A bus message to send once the transaction that made it commits."""

    subject: str
    payload: bytes
    id: str = field(default_factory=lambda: str(uuid.uuid4()))


# Builds the bus messages that announce a change, from the record as it will be committed and its
# Deployment (the one the change answers with, built once for both).
OutboxFn = Callable[[DeploymentRow, pb.Deployment], Sequence[Outgoing]]


@dataclass(frozen=True)
class NewDeployment:
    user_id: str
    name: str
    app_type: str
    geographic_region: str
    spec: dict[str, Any]
    request_id: str | None
    request_hash: str
    # What it holds against its owner's quotas.
    demand: quota_rules.Usage = field(default_factory=quota_rules.Usage)
    # What made release 1: create, promote (a copy of another deployment) or adopt.
    made_by: str = "create"
    reason: str = ""
    target_location: str | None = None
    promoted_from: str | None = None
    is_adopted: bool = False
    source_namespace: str | None = None
    # The id to give it; chosen by the caller when the spec depends on it (sealed secret values).
    id: str | None = None


class NameTaken(Exception):
    def __init__(self, existing_id: str | None) -> None:
        super().__init__(existing_id)
        self.existing_id = existing_id


class RequestIdReused(Exception):
    """The request_id was used before, for a request with other contents."""


@dataclass(frozen=True)
class Change:
    """A change applied to a record: the record after it, the event that made it, and the
    Deployment as it left it (each change has its own copy of the record)."""

    row: DeploymentRow
    event: EventRow
    deployment: pb.Deployment
    # Changes of other records the same transaction made (a promoted copy finishing its source's promote).
    also: tuple[Change, ...] = ()


def _json_bytes(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


def _text_bytes(observed: Mapping[str, Any]) -> int:
    return sum(len(value.encode()) for value in observed.values() if isinstance(value, str))


def _record_bytes(row: DeploymentRow, observed: Mapping[str, Any]) -> int:
    """What a record stores: its spec, its observed fields (as `observed_of` reads them) and its names;
    counted in the quota."""
    names = (row.name, row.geographic_region, row.request_hash, row.request_id or "")
    return _RECORD_OVERHEAD + _json_bytes(row.spec) + _text_bytes(observed) + sum(map(len, names))


def _release_bytes(release: ReleaseRow) -> int:
    """What a release stores; counted in its deployment's history_bytes (releases are never trimmed)."""
    spec = _json_bytes(release.spec) if release.spec is not None else 0
    return _EVENT_OVERHEAD + spec + len(release.reason.encode()) + len(release.actor or "")


def _event_bytes(event: EventRow) -> int:
    """What an event stores; a deployment's history_bytes is the sum over its kept events."""
    texts = (event.event_id, event.message, event.source, event.actor or "", event.operation or "")
    return _EVENT_OVERHEAD + _json_bytes(event.changes) + sum(len(text.encode()) for text in texts)


@dataclass(frozen=True)
class EventInput:
    """A status change as the scheduler, a provisioner or the API reports it."""

    event_id: str
    status: str
    phase: str
    message: str
    source: str
    simulated: bool = False
    final: bool = False
    time: datetime | None = None
    # The user who asked for the change (audit); None for what the platform reports.
    actor: str | None = None
    # Record fields the event sets; absent ones stay.
    fields: dict[str, str] = field(default_factory=dict)
    # The operation the change belongs to, and the release it is about (0: none).
    operation: str | None = None
    release: int = 0
    # A worker's verdict on `release`: it runs healthy, or it could not be rolled out.
    release_healthy: bool = False
    release_failed: bool = False
    # Further columns the service itself sets (the desired state of an operation), unfiltered.
    record: dict[str, Any] = field(default_factory=dict)
    # The release this change makes; its number is record["release"].
    new_release: NewRelease | None = None


@dataclass(frozen=True)
class NewRelease:
    spec: dict[str, Any]
    operation: str
    actor: str | None
    reason: str = ""
    rollback_of: int | None = None


# Operations whose release a worker rolls out in place; a failed one is rolled back by itself.
ROLLOUTS = frozenset({"update", "scale", "rollback"})
# Builds the change an owner's operation makes from the record as it is now (raising to refuse it).
Plan = Callable[[DeploymentRow], EventInput]


# Record fields a reported event may set (the optional fields of bus_pb2.StatusEvent).
SETTABLE = (
    "endpoint_url",
    "error_message",
    "provider",
    "region",
    "cluster_status",
    "cluster_error",
    "git_path",
    "values_yaml",
    "location_id",
)


# The most creates one group transaction writes; the rest wait for the next.
_GROUP_MOST = 128
# The most records one read (get) asks for.
_READ_MOST = 64
# The most outbox rows one read of the relay's (unsent) returns.
UNSENT_MOST = 256


@dataclass(frozen=True)
class _Creating:
    """A create's records, built before its transaction: written alone, or with a group."""

    new: NewDeployment
    quotas: quota_rules.Quotas | None
    row: DeploymentRow
    event: EventRow
    release: ReleaseRow
    outbox: list[OutboxRow]
    # The record's Deployment, as its change answers with it.
    deployment: pb.Deployment

    @property
    def checked(self) -> bool:
        return self.quotas is not None and self.quotas.enforced

    @property
    def demand(self) -> quota_rules.Usage:
        """What it holds against its owner's quotas, its stored bytes included."""
        return dataclasses.replace(self.new.demand, stored_bytes=self.row.record_bytes + self.row.history_bytes)


# What a create in a group is answered: written, a replayed record (no change), or why it was refused.
_Answer = _Creating | tuple[DeploymentRow, Change | None] | Exception


def _group_rows(dialect: Dialect, written: Sequence[_Creating]) -> list[tuple[str, list[tuple[Any, ...]]]]:
    """The executemany of each table a group of creates writes, in the group's order (the outbox's seq,
    so the relay sends them in it)."""
    tables: list[Sequence[Base]] = [
        [c.row for c in written],
        [c.event for c in written],
        [c.release for c in written],
        [message for c in written for message in c.outbox],
    ]
    return [_insert_rows(dialect, records) for records in tables if records]


@dataclass(frozen=True)
class _Mutating:
    """An owner's operation waiting for a group transaction, with the context of the call that asked."""

    deployment_id: str
    user_id: str | None
    plan: Plan
    outbox: OutboxFn | None
    quotas: quota_rules.Quotas | None
    demand: quota_rules.Usage | None
    # The caller's context (its trace): its part of the group runs in it, so its outbox rows carry it.
    context: contextvars.Context
    done: asyncio.Future[Change]

    @property
    def checked(self) -> bool:
        return self.quotas is not None and self.demand is not None and self.quotas.enforced

    def check(self, used: quota_rules.Usage, row: DeploymentRow) -> None:
        """QUOTA_EXCEEDED when the owner's other deployments (`used` less what `row` holds) and the
        demand would not fit."""
        if self.quotas is not None and self.demand is not None and self.quotas.enforced:
            quota_rules.check(self.quotas, used - quota_rules.held(row), self.demand)


def new_record(new: NewDeployment, moment: datetime, **given: Any) -> DeploymentRow:
    """The pending record a create makes of `new` at `moment`; `given` sets or overrides columns (a
    validate_only preview has no id yet)."""
    columns: dict[str, Any] = {
        "id": new.id or str(uuid.uuid4()),
        "user_id": new.user_id,
        "cluster_id": str(uuid.uuid4()),
        "name": new.name,
        "live_name": new.name,
        "app_type": new.app_type,
        "status": "pending",
        "phase": "accepted",
        "geographic_region": new.geographic_region,
        "spec": new.spec,
        "request_id": new.request_id,
        "request_hash": new.request_hash,
        "revision": 1,
        "is_adopted": new.is_adopted,
        "source_namespace": new.source_namespace,
        "target_location": new.target_location,
        "promoted_from": new.promoted_from,
        "release": 1,
        "image_updates_paused": False,
        "cpu_millis": new.demand.cpu_millis,
        "memory_mb": new.demand.memory_mb,
        "storage_gb": new.demand.storage_gb,
        "created_at": moment,
        "updated_at": moment,
    }
    return _plain(DeploymentRow, columns | given)


def _creating(new: NewDeployment, outbox: OutboxFn, quotas: quota_rules.Quotas | None) -> _Creating:
    """The records a create writes: the pending deployment, its first event, release 1 and its outbox rows."""
    moment = now()
    row = new_record(new, moment)
    observed = observed_of(row)
    event = _plain(
        EventRow,
        {
            "event_id": f"api:{row.id}:1",
            "deployment_id": row.id,
            "revision": 1,
            "status": "pending",
            "phase": "accepted",
            "message": "deployment accepted",
            "source": "api",
            "simulated": False,
            "final": False,
            "time": moment,
            "actor": new.user_id,
            "operation": new.made_by,
            "release": 1,
            # The first event is the base every later change is folded onto.
            "changes": observed,
        },
    )
    release = _plain(
        ReleaseRow,
        {
            "deployment_id": row.id,
            "number": 1,
            # The current release's spec is the record's.
            "spec": None,
            "operation": new.made_by,
            "actor": new.user_id,
            "reason": new.reason,
            "created_at": moment,
            "healthy": False,
        },
    )
    row.record_bytes = _record_bytes(row, observed)
    row.history_bytes = _event_bytes(event) + _release_bytes(release)
    deployment = row_to_proto(row)
    return _Creating(
        new, quotas, row, event, release, _outbox_rows(outbox(row, deployment), moment, row.id), deployment
    )


def _outbox_rows(messages: Sequence[Outgoing], moment: datetime, deployment_id: str) -> list[OutboxRow]:
    # The relay sends the rows later, from another task: each keeps the trace it was made in.
    headers = tracing.outbox_headers(deployment_id)
    return [
        _plain(
            OutboxRow,
            {
                "id": message.id,
                "subject": message.subject,
                "payload": message.payload,
                "headers": headers,
                "created_at": moment,
            },
        )
        for message in messages
    ]


def _by_user(pairs: Iterable[tuple[str, str | None]]) -> dict[str, set[str]]:
    """(user, key) pairs as each user's keys."""
    keys: dict[str, set[str]] = {}
    for user_id, key in pairs:
        if key is not None:
            keys.setdefault(user_id, set()).add(key)
    return keys


def _keyed(column: Any, keys: Mapping[str, set[str]]) -> Any:
    """The records of each user with one of that user's keys in `column` (a unique (user_id, column) index).

    Written per user, not as a (user_id, column) IN list of pairs: SQLite searches its index for a
    pair list of one, but reads the whole table for two or more.
    """
    return or_(
        *(and_(DeploymentRow.user_id == user_id, column.in_(sorted(values))) for user_id, values in keys.items())
    )


@dataclass(frozen=True)
class _Insert:
    """An INSERT of some of a table's columns, compiled once and run as the driver's executemany: its
    SQL and, per parameter in order, the column it fills, the value it takes when a record left it
    unset (the column's Python default where one is written, else NULL) and how it is encoded."""

    sql: str
    binds: tuple[tuple[str, bool, Any, Callable[[Any], Any] | None], ...]

    @classmethod
    def compile(cls, dialect: Dialect, table: Table, keys: tuple[str, ...]) -> _Insert:
        # For an executemany: no RETURNING of the generated keys, which nothing reads.
        compiled = insert(table).compile(dialect=dialect, column_keys=list(keys), for_executemany=True)
        prefetched = {column.key for column in compiled.insert_prefetch}
        binds = []
        for name in compiled.positiontup or ():
            column = table.c[name]
            default = None
            if name in prefetched:
                if not isinstance(column.default, ScalarElementColumnDefault):
                    raise TypeError(f"{table.name}.{name}: only a constant default can be written by _Insert")
                default = column.default.arg
            binds.append((name, name in keys, default, column.type.dialect_impl(dialect).bind_processor(dialect)))
        return cls(compiled.string, tuple(binds))

    def parameters(self, given: Mapping[str, Any]) -> tuple[Any, ...]:
        values = []
        for name, named, default, encode in self.binds:
            value = given.get(name) if named else default
            # Encoded even when None: a JSON column stores None as JSON null, as SQLAlchemy's own insert did.
            values.append(value if encode is None else encode(value))
        return tuple(values)


@lru_cache(maxsize=64)
def _insert_statement(dialect: Dialect, table: Table, keys: tuple[str, ...]) -> _Insert:
    return _Insert.compile(dialect, table, keys)


def _insert_rows(dialect: Dialect, records: Sequence[Base]) -> tuple[str, list[tuple[Any, ...]]]:
    """One executemany that inserts records of one table, in their order, without the ORM's flush: its
    SQL and its rows of parameters.

    The statement names the columns any of the records was given (one executemany needs the same
    columns in every row): a record that left one of them unset writes NULL there; columns no record
    set stay out and take their defaults, as in a flush. It is compiled once per set of columns and
    its parameters encoded here, so SQLAlchemy neither compiles nor processes it again per call.
    """
    table = Base.metadata.tables[records[0].__tablename__]
    # What the ORM holds of each record: the values it was given.
    given = [record.__dict__ for record in records]
    keys = tuple(column.key for column in table.columns if any(column.key in values for values in given))
    statement = _insert_statement(dialect, table, keys)
    return statement.sql, [statement.parameters(values) for values in given]


async def _insert_all(connection: AsyncConnection, records: Sequence[Base]) -> None:
    """Inserts records of one table with one executemany in the connection's transaction (`_insert_rows`)."""
    if not records:
        return
    sql, rows = _insert_rows(connection.dialect, records)
    await connection.exec_driver_sql(sql, rows)


# The tables, for the Core statements of changes (no unit of work, no identity map).
_RECORDS = cast(Table, DeploymentRow.__table__)
_RECORD_TABLE_COLUMNS = tuple(column.key for column in _RECORDS.columns)
_RELEASES = cast(Table, ReleaseRow.__table__)
# What a record's write is matched on besides its id (the revision read) and what it adds to its byte
# counts (relative, as trim_events changes history_bytes too).
_GIVEN = ("read_revision", "record_grew", "history_grew")


_Row = TypeVar("_Row", bound=Base)


def _plain(kind: type[_Row], values: Mapping[Any, Any]) -> _Row:
    """A row of these column values that no session knows, made as the ORM makes the rows it loads: the
    mapped constructor sets each attribute through its change tracking, some twenty times the cost,
    and an applied change makes two (its record and its event) and reads one."""
    row: _Row = kind.__mapper__.class_manager.new_instance()
    row.__dict__.update(values)
    return row


@dataclass(frozen=True)
class _Write:
    """A Core write statement compiled once, to run as driver SQL in a session's transaction: its SQL
    and, per parameter in order, its name and how its value is encoded (the bind's own processor)."""

    sql: str
    binds: tuple[tuple[str, Callable[[Any], Any] | None], ...]
    # Parameters the statement holds with their values (a `.values(healthy=True)`).
    constants: dict[str, Any]

    @classmethod
    def compile(cls, dialect: Dialect, statement: Any) -> _Write:
        compiled = statement.compile(dialect=dialect)
        return cls(
            compiled.string,
            tuple(
                (name, compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect))
                for name in compiled.positiontup or ()
            ),
            compiled.params,
        )

    def parameters(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        given = [values[name] if name in values else self.constants[name] for name, _ in self.binds]
        return tuple(
            value if encode is None else encode(value) for value, (_, encode) in zip(given, self.binds, strict=True)
        )

    async def run(self, connection: AsyncConnection, rows: Sequence[Mapping[str, Any]]) -> CursorResult[Any]:
        """Runs it once per row of values (one row: a lone execute, its result rows readable)."""
        encoded = [self.parameters(values) for values in rows]
        return await connection.exec_driver_sql(self.sql, encoded[0] if len(encoded) == 1 else encoded)


@lru_cache(maxsize=256)
def _record_update(dialect: Dialect, columns: tuple[str, ...]) -> _Write:
    """The statement that writes the changes of many records that set the same columns, each only if
    it is still at the revision read (the parameters v_<name>: ids, revisions, byte growths, values).

    On PostgreSQL one statement whose parameters are arrays, one element a record, returning the ids
    it wrote (its driver reports no row count for an executemany); on SQLite an UPDATE executed for
    many, whose row count is the sum of theirs.
    """
    names = ("id", *_GIVEN, *columns)
    types = {name: _RECORDS.c[name].type for name in ("id", *columns)} | {name: BigInteger() for name in _GIVEN}
    if dialect.name == "postgresql":
        given: Any = (
            func.unnest(*(bindparam(f"v_{name}", type_=ARRAY(types[name])) for name in names))
            .table_valued(*(column(name, types[name]) for name in names))
            .render_derived(name="v")
            .c
        )
    else:
        given = {name: bindparam(f"v_{name}", type_=types[name]) for name in names}
    statement = (
        update(_RECORDS)
        .where(_RECORDS.c.id == given["id"], _RECORDS.c.revision == given["read_revision"])
        .values(
            {name: given[name] for name in columns}
            | {
                "record_bytes": _RECORDS.c.record_bytes + given["record_grew"],
                "history_bytes": _RECORDS.c.history_bytes + given["history_grew"],
            }
        )
    )
    return _Write.compile(dialect, statement.returning(_RECORDS.c.id) if dialect.name == "postgresql" else statement)


# A release by its deployment and number, in a statement run for many releases at once (executemany).
_ONE_RELEASE = (
    _RELEASES.c.deployment_id == bindparam("v_deployment_id"),
    _RELEASES.c.number == bindparam("v_number"),
)


@lru_cache(maxsize=8)
def _release_healthy(dialect: Dialect) -> _Write:
    """Marks releases healthy."""
    return _Write.compile(dialect, update(_RELEASES).where(*_ONE_RELEASE).values(healthy=True))


@lru_cache(maxsize=8)
def _release_keeps(dialect: Dialect) -> _Write:
    """Gives replaced releases the spec they keep from then on."""
    spec = bindparam("v_spec", type_=_RELEASES.c.spec.type)
    return _Write.compile(dialect, update(_RELEASES).where(*_ONE_RELEASE).values(spec=spec))


@dataclass
class _Written:
    """A record's changes in a batch, merged into its one write: the revision it was read at, the
    columns the changes set (the last change's value of each) and what they added to its byte counts."""

    revision: int
    values: dict[str, Any]
    record_grew: int
    history_grew: int


class _Batch:
    """What one transaction of changes knows: the records as its writes left them, which event ids
    are stored, and the writes still to make: the records' updates, the new releases, the specs the
    replaced ones keep, the outbox rows, the releases that ran healthy and the events, each kind in
    one statement when the batch is flushed."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self._connection: AsyncConnection | None = None
        # By id; None for a record that does not exist.
        self.rows: dict[str, DeploymentRow | None] = {}
        # The event ids looked up, and those of them that are stored (or will be, with `events`).
        self.checked: set[str] = set()
        self.seen: set[str] = set()
        self.events: list[EventRow] = []
        # By record id, in the order of their first change.
        self.written: dict[str, _Written] = {}
        # (deployment id, number) of each release that ran healthy.
        self.healthy: list[tuple[str, int]] = []
        # The releases the changes made, by (deployment id, number), in the order made.
        self.releases: dict[tuple[str, int], ReleaseRow] = {}
        # The spec each release that a newer one replaced keeps from now on, by (deployment id, number).
        self.kept: dict[tuple[str, int], dict[str, Any]] = {}
        # The bus messages the changes made, in the order made (the relay sends them in it).
        self.outbox: list[OutboxRow] = []

    async def connection(self) -> AsyncConnection:
        """The transaction's connection, asked of the session once (each ask is a greenlet of its own)."""
        if self._connection is None:
            self._connection = await self.session.connection()
        return self._connection

    async def load(self, ids: Sequence[str]) -> None:
        """Reads the records not read yet, in one statement: plain rows, not in the session, so that a
        write is one `UPDATE` and the record after it is built from the values written."""
        wanted = {deployment_id for deployment_id in ids if deployment_id not in self.rows}
        if not wanted:
            return
        for values in await _fetch_in(await self.connection(), _records_statement, sorted(wanted)):
            self.rows[values["id"]] = _plain(DeploymentRow, values)
        for deployment_id in wanted:
            self.rows.setdefault(deployment_id, None)

    async def look_up(self, event_ids: Sequence[str]) -> None:
        """Learns which of the event ids are stored, in one statement."""
        wanted = {event_id for event_id in event_ids if event_id not in self.checked}
        if not wanted:
            return
        self.seen.update(
            found["event_id"]
            for found in await _fetch_in(await self.connection(), _stored_events_statement, sorted(wanted))
        )
        self.checked.update(wanted)

    def add(
        self, read: DeploymentRow, row: DeploymentRow, values: dict[str, Any], grew: tuple[int, int], event: EventRow
    ) -> None:
        """Records a change of `read` (the record as the batch had it): the record after it is `row`,
        made by setting `values` and adding `grew` to its byte counts, and it logs `event`."""
        self.rows[row.id] = row
        self.checked.add(event.event_id)
        self.seen.add(event.event_id)
        self.events.append(event)
        written = self.written.get(row.id)
        if written is None:
            self.written[row.id] = _Written(read.revision, dict(values), *grew)
        else:
            written.values.update(values)
            written.record_grew += grew[0]
            written.history_grew += grew[1]

    def release(self, release: ReleaseRow) -> None:
        """A new release, inserted with the batch's."""
        self.releases[(release.deployment_id, release.number)] = release

    def keep(self, deployment_id: str, number: int, spec: dict[str, Any]) -> None:
        """The spec a release that a newer one replaces keeps (the record holds the newer one's)."""
        made = self.releases.get((deployment_id, number))
        if made is not None:
            made.spec = spec
        else:
            self.kept[(deployment_id, number)] = spec

    async def write_releases(self) -> None:
        """Writes the new releases, the specs the replaced ones keep and the outbox rows, each kind in
        one statement, so that what reads releases next in the transaction sees them."""
        releases, self.releases = self.releases, {}
        kept, self.kept = self.kept, {}
        outbox, self.outbox = self.outbox, []
        connection = await self.connection()
        await _insert_all(connection, list(releases.values()))
        if kept:
            await _release_keeps(connection.dialect).run(
                connection,
                [{"v_deployment_id": key, "v_number": number, "v_spec": spec} for (key, number), spec in kept.items()],
            )
        await _insert_all(connection, outbox)

    async def flush(self) -> None:
        """Writes what the changes made: each record only if it is still at the revision the batch
        read (else _Raced: another writer changed it since), then the releases that ran healthy and
        the events; a stored event id fails the events' insert (IntegrityError)."""
        written, self.written = self.written, {}
        healthy, self.healthy = self.healthy, []
        events, self.events = self.events, []
        connection = await self.connection()
        dialect = connection.dialect
        # The records that set the same columns are written by one statement.
        shapes: dict[tuple[str, ...], list[str]] = {}
        for deployment_id, write in written.items():
            shapes.setdefault(tuple(sorted(write.values)), []).append(deployment_id)
        for columns, ids in shapes.items():
            writes = [written[deployment_id] for deployment_id in ids]
            statement = _record_update(dialect, columns)
            if dialect.name == "postgresql":
                arrays: dict[str, list[Any]] = {
                    "v_id": ids,
                    "v_read_revision": [write.revision for write in writes],
                    "v_record_grew": [write.record_grew for write in writes],
                    "v_history_grew": [write.history_grew for write in writes],
                }
                arrays.update({f"v_{name}": [write.values[name] for write in writes] for name in columns})
                count = len((await statement.run(connection, [arrays])).all())
            else:
                rows = [
                    {
                        "v_id": deployment_id,
                        "v_read_revision": write.revision,
                        "v_record_grew": write.record_grew,
                        "v_history_grew": write.history_grew,
                    }
                    | {f"v_{name}": write.values[name] for name in columns}
                    for deployment_id, write in zip(ids, writes, strict=True)
                ]
                count = (await statement.run(connection, rows)).rowcount
            if count != len(ids):
                raise _Raced
        # Before the healthy marks: a release this batch made may be one of them.
        await self.write_releases()
        if healthy:
            await _release_healthy(dialect).run(
                connection, [{"v_deployment_id": key, "v_number": number} for key, number in healthy]
            )
        await _insert_all(connection, events)


def heavy_histories(keep_bytes: int) -> Select[str]:
    """The ids of the records whose history holds more than `keep_bytes`; at HISTORY_BYTES, read from the
    partial index of exactly those records (the condition written as the index states it)."""
    if keep_bytes == HISTORY_BYTES:
        return select(DeploymentRow.id).where(text(HEAVY_HISTORY))
    return select(DeploymentRow.id).where(DeploymentRow.history_bytes > keep_bytes)


def long_histories(keep: int) -> Select[str]:
    """The ids of the records that keep more than `keep` events; at EVENT_HISTORY, read from the partial
    index of exactly those records. Every revision is one event, so they are counted without reading one."""
    if keep == EVENT_HISTORY:
        return select(DeploymentRow.id).where(text(LONG_HISTORY))
    return select(DeploymentRow.id).where(DeploymentRow.revision - DeploymentRow.events_from >= keep)


class DeploymentStore:
    """Reads and writes deployments; every write also appends its event and its outbox rows."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        # Set after every commit that wrote outbox rows, so the relay sends them at once.
        self.outbox_written: Callable[[], None] = lambda: None
        # SQLite has one writer at a time. Left to itself, a second writer waits in SQLite's busy
        # handler, which sleeps in growing steps (up to 100 ms) while the file is locked; queued
        # here instead, this process's writers take turns in the event loop as soon as one commits.
        self._writer = asyncio.Lock() if engine.dialect.name == "sqlite" else None
        # The requests a worker's report can lead to, built by the service (servicer.placement_outbox):
        # the rollout of an automatic rollback, and the delete that ends a migration.
        self.update_outbox: OutboxFn = lambda row, deployment: []
        self.delete_outbox: OutboxFn = lambda row, deployment: []
        # Creates waiting for the group transaction after the one being written (group commit).
        self._waiting: list[tuple[_Creating, asyncio.Future[tuple[DeploymentRow, Change | None]]]] = []
        self._grouping: asyncio.Task[None] | None = None
        # Owners' operations (mutate) waiting for the group transaction after the one being written.
        self._mutations: list[_Mutating] = []
        self._mutating: asyncio.Task[None] | None = None
        # Records asked for at one moment, read together in one statement.
        self._reads: Batcher[str, dict[str, Any] | None] = Batcher(self._read_records, most=_READ_MOST)
        self._unsent = _DriverStatement.compile(
            self.engine.dialect,
            (_OUTBOX.c.id, _OUTBOX.c.subject, _OUTBOX.c.payload, _OUTBOX.c.headers),
            lambda query: query.order_by(_OUTBOX.c.seq).limit(bindparam("limit", type_=Integer)),
        )

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A write transaction, committed at the end unless it raises."""
        async with contextlib.AsyncExitStack() as held:
            if self._writer is not None:
                await held.enter_async_context(self._writer)
            yield await held.enter_async_context(self._sessions.begin())

    async def usage(self, user_id: str) -> quota_rules.Usage:
        """What the user's deployments hold: resources until their teardown ends, stored bytes until purged."""
        async with self._sessions() as session:
            return await self._usage(session, user_id)

    @staticmethod
    async def _usage(session: AsyncSession, user_id: str) -> quota_rules.Usage:
        return (await DeploymentStore._usages(session, [user_id]))[user_id]

    @staticmethod
    async def _usages(session: AsyncSession, user_ids: Sequence[str]) -> dict[str, quota_rules.Usage]:
        live = DeploymentRow.deleted_at.is_(None)

        def live_sum(column: Any) -> Any:
            return func.coalesce(func.sum(case((live, column), else_=0)), 0)

        rows = (
            await session.execute(
                select(
                    DeploymentRow.user_id,
                    func.coalesce(func.sum(case((live, 1), else_=0)), 0),
                    live_sum(DeploymentRow.cpu_millis),
                    live_sum(DeploymentRow.memory_mb),
                    live_sum(DeploymentRow.storage_gb),
                    # A deleted record stays stored until it is purged (purge_deleted): its bytes still count.
                    func.coalesce(func.sum(DeploymentRow.record_bytes + DeploymentRow.history_bytes), 0),
                )
                .where(DeploymentRow.user_id.in_(user_ids))
                .group_by(DeploymentRow.user_id)
            )
        ).all()
        found = {user: quota_rules.Usage(*(int(value) for value in values)) for user, *values in rows}
        return {user: found.get(user, quota_rules.Usage()) for user in user_ids}

    @staticmethod
    async def _lock_user(session: AsyncSession, user_id: str) -> None:
        """Holds, until the transaction ends, a lock that every quota-checked create of this user takes first.

        Then the usage read next includes every deployment another create committed before, and
        none can commit in between: two concurrent creates never both fit under one limit.
        """
        await DeploymentStore._lock_users(session, [user_id])

    @staticmethod
    async def _lock_users(session: AsyncSession, user_ids: Sequence[str]) -> None:
        """_lock_user for several users, taken in sorted order so that two groups never wait on each other.

        On SQLite, the database-wide write lock, whatever the users (none too).
        """
        connection = await session.connection()
        if connection.dialect.name == "sqlite":
            # The driver opens a transaction only at the first write; take the (database-wide) write
            # lock before the read.
            await connection.exec_driver_sql("BEGIN IMMEDIATE")
            return
        for user_id in sorted(set(user_ids)):
            # Per user, across processes; released at commit or rollback.
            await connection.execute(select(func.pg_advisory_xact_lock(_QUOTA_LOCK_SPACE, func.hashtext(user_id))))

    def session(self) -> AsyncSession:
        return self._sessions()

    async def create(
        self,
        new: NewDeployment,
        outbox: OutboxFn,
        *,
        quotas: quota_rules.Quotas | None = None,
        also: tuple[str, Callable[[DeploymentRow], Plan], OutboxFn | None] | None = None,
    ) -> tuple[DeploymentRow, Change | None]:
        """Stores a pending deployment; returns it with its first change, or with None on a request_id replay.

        With quotas, raises the QUOTA_EXCEEDED ServiceError when the user's deployments and this one
        together would exceed one; a request_id replay is answered even then. `also` (a record's id,
        a plan made from the new row, its outbox) changes another record in the same transaction:
        the source of a promote; the change is in the returned Change's `also`.

        Creates without `also` that arrive while a group is being written wait, and are written
        together in the next transaction (group commit); each is answered as if written alone.
        """
        # Built here, in the caller's context: the outbox rows keep the caller's trace.
        creating = _creating(new, outbox, quotas)
        if also is not None:
            return await self._create_alone(creating, also)
        done: asyncio.Future[tuple[DeploymentRow, Change | None]] = asyncio.get_running_loop().create_future()
        self._waiting.append((creating, done))
        if self._grouping is None or self._grouping.done():
            self._grouping = asyncio.create_task(self._write_groups())
        return await done

    async def _create_alone(
        self,
        creating: _Creating,
        also: tuple[str, Callable[[DeploymentRow], Plan], OutboxFn | None] | None = None,
    ) -> tuple[DeploymentRow, Change | None]:
        """One create in its own transaction, through the ORM (with `also`, or after a group failed)."""
        new, row = creating.new, creating.row
        if new.request_id is not None:
            replay = await self._replay(new)
            if replay is not None:
                return replay, None
        quotas = creating.quotas
        try:
            async with self.transaction() as session:
                if quotas is not None and quotas.enforced:
                    await self._lock_user(session, new.user_id)
                    quota_rules.check(quotas, await self._usage(session, new.user_id), creating.demand)
                session.add(row)
                await session.flush()
                session.add(creating.event)
                session.add(creating.release)
                session.add_all(creating.outbox)
                others: tuple[Change, ...] = ()
                if also is not None:
                    other_id, make_plan, other_outbox = also
                    other = await self._mutate_in(session, other_id, None, make_plan(row), other_outbox)
                    others = (other,)
        except IntegrityError:
            if new.request_id is not None:
                replay = await self._replay(new)
                if replay is not None:
                    return replay, None
            raise NameTaken(await self._live_id(new.user_id, new.name)) from None
        self.outbox_written()
        return row, Change(row, creating.event, creating.deployment, also=others)

    async def _write_groups(self) -> None:
        """Writes the waiting creates, one group per transaction, until none wait."""
        while self._waiting:
            taken = self._waiting[:_GROUP_MOST]
            del self._waiting[:_GROUP_MOST]
            # A caller that gave up (its call was cancelled) is not written.
            group = [(creating, done) for creating, done in taken if not done.done()]
            if group:
                await self._write_group(group)

    async def _write_group(
        self, group: Sequence[tuple[_Creating, asyncio.Future[tuple[DeploymentRow, Change | None]]]]
    ) -> None:
        """Writes a group in one transaction and answers each caller; on a conflict the group's look
        could not see (another process's write), each is written on its own for its precise answer."""
        answers: list[_Answer] = []
        wrote = False
        try:
            try:
                creates = [creating for creating, _ in group]
                if len(creates) == 1 and creates[0].new.request_id is None and not creates[0].checked:
                    # One create with nothing to look up, in one call to the driver: its insert meets the
                    # unique name index itself, and a taken name fails it (IntegrityError), after which
                    # _create_alone names the holder.
                    await self._write_on_driver(_group_rows(self.engine.dialect, creates))
                    answers = list(creates)
                else:
                    async with self.transaction() as session:
                        answers = await self._group_in(session, creates)
            except IntegrityError:
                answers = []
                for creating, _ in group:
                    try:
                        answers.append(await self._create_alone(creating))
                    except Exception as refused:
                        answers.append(refused)
            else:
                wrote = any(isinstance(answer, _Creating) for answer in answers)
        except Exception as failure:
            answers = [failure] * len(group)
        finally:
            for (_, done), answer in itertools.zip_longest(group, answers):
                if done.done():
                    continue
                if answer is None:
                    # The writer itself was cancelled before it had an answer.
                    done.cancel()
                elif isinstance(answer, Exception):
                    done.set_exception(answer)
                elif isinstance(answer, _Creating):
                    row = answer.row
                    try:
                        done.set_result((row, Change(row, answer.event, answer.deployment)))
                    except Exception as failure:
                        done.set_exception(failure)
                else:
                    done.set_result(answer)
            # The relay is woken once the callers are: their answers go out before it reads the outbox.
            if wrote:
                self.outbox_written()

    async def _group_in(self, session: AsyncSession, group: Sequence[_Creating]) -> list[_Answer]:
        """Checks and writes a group in order, as one create after another would be: each one's
        answer is the written create, a replayed record, or why it was refused."""
        checked = sorted({creating.new.user_id for creating in group if creating.checked})
        # On SQLite also without quotas: the looks below must still hold when the group writes.
        await self._lock_users(session, checked)
        used = await self._usages(session, checked) if checked else {}
        requests = _by_user((c.new.user_id, c.new.request_id) for c in group if c.new.request_id is not None)
        stored: dict[tuple[str, str | None], DeploymentRow] = {}
        if requests:
            found = await session.scalars(select(DeploymentRow).where(_keyed(DeploymentRow.request_id, requests)))
            stored = {(row.user_id, row.request_id): row for row in found}
        names = _by_user((c.new.user_id, c.new.name) for c in group)
        live = await session.execute(
            select(DeploymentRow.user_id, DeploymentRow.live_name, DeploymentRow.id).where(
                _keyed(DeploymentRow.live_name, names)
            )
        )
        taken: dict[tuple[str, str | None], str] = {(user, name): id_ for user, name, id_ in live.all()}
        answers: list[_Answer] = []
        written: list[_Creating] = []
        for creating in group:
            new = creating.new
            request = (new.user_id, new.request_id)
            prior = stored.get(request) if new.request_id is not None else None
            if prior is not None:
                answers.append((prior, None) if prior.request_hash == new.request_hash else RequestIdReused())
                continue
            if creating.quotas is not None and creating.checked:
                try:
                    quota_rules.check(creating.quotas, used[new.user_id], creating.demand)
                except ServiceError as refused:
                    answers.append(refused)
                    continue
            name = (new.user_id, new.name)
            if name in taken:
                answers.append(NameTaken(taken[name]))
                continue
            # What the creates after it in the group see, as they would after its commit.
            taken[name] = creating.row.id
            if new.request_id is not None:
                stored[request] = creating.row
            if new.user_id in used:
                used[new.user_id] += creating.demand
            written.append(creating)
            answers.append(creating)
        await self._insert_group(session, written)
        return answers

    @staticmethod
    async def _insert_group(session: AsyncSession, written: Sequence[_Creating]) -> None:
        """Core executemany: one statement per table for the whole group, in the group's order (the
        outbox's seq, so the relay sends them in it)."""
        if written:
            connection = await session.connection()
            for sql, rows in _group_rows(connection.dialect, written):
                await connection.exec_driver_sql(sql, rows)

    async def _replay(self, new: NewDeployment) -> DeploymentRow | None:
        async with self._sessions() as session:
            found = await session.scalar(
                select(DeploymentRow).where(
                    DeploymentRow.user_id == new.user_id, DeploymentRow.request_id == new.request_id
                )
            )
        if found is not None and found.request_hash != new.request_hash:
            raise RequestIdReused
        return found

    async def _live_id(self, user_id: str, name: str) -> str | None:
        async with self._sessions() as session:
            found: str | None = await session.scalar(
                select(DeploymentRow.id).where(DeploymentRow.user_id == user_id, DeploymentRow.live_name == name)
            )
            return found

    async def get(self, user_id: str | None, deployment_id: str) -> DeploymentRow | None:
        """The deployment if `user_id` owns it; user_id None (an admin) reads any.

        Read as a plain row on the driver's own connection (no session, no transaction); the records
        asked for at one moment are read in one statement.
        """
        found = await self._reads.ask(deployment_id)
        if found is None or (user_id is not None and found["user_id"] != user_id):
            return None
        return DeploymentRow(**found)

    async def _read_records(self, ids: Sequence[str]) -> list[dict[str, Any] | None]:
        statement, values = _by_keys(_records_statement, self.engine.dialect, ids)
        at = statement.names.index("id")
        rows = {row[at]: row for row in await self._fetch_raw(statement, values)}
        # Each asker decodes its own: no two rows share a spec's dict.
        return [statement.record(rows[deployment_id]) if deployment_id in rows else None for deployment_id in ids]

    async def page(
        self,
        user_id: str | None,
        *,
        statuses: Sequence[str] = (),
        geographic_region: str = "",
        show_deleted: bool = False,
        before_seq: int | None = None,
        limit: int,
    ) -> list[dict[str, Any]]:
        """One page, newest first: at most `limit` rows older than before_seq; user_id None: every user's.

        Records whose teardown finished are left out unless show_deleted. Each row is a dict of `seq`
        and RECORD_COLUMNS: a page is answered, never written back.

        The statement of each combination of filters is compiled once and run on the driver's own
        connection in one call (aiosqlite: one trip to its thread instead of four; asyncpg: one
        prepared fetch, no transaction), its columns decoded by their types' own result processors.
        """
        shape = (user_id is not None, len(statuses), bool(geographic_region), show_deleted, before_seq is not None)
        statement = _page_statement(self.engine.dialect, *shape)
        values: dict[str, Any] = {"user_id": user_id, "region": geographic_region, "before": before_seq}
        values.update({f"status_{index}": status for index, status in enumerate(statuses)})
        values["limit"] = limit
        return await self._fetch(statement, values)

    async def phase_events(self, deployment_ids: Sequence[str], phases: tuple[str, ...]) -> list[dict[str, Any]]:
        """The logged events of these deployments in these phases (deployment_id, phase, revision, time), in
        one statement compiled once per padded count of ids, read on the driver's own connection."""

        def statement(dialect: Dialect, count: int) -> _DriverStatement:
            return _phase_events_statement(dialect, count, phases)

        compiled, values = _by_keys(statement, self.engine.dialect, sorted(set(deployment_ids)))
        return await self._fetch(compiled, values)

    async def _fetch(self, statement: _DriverStatement, values: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The statement's rows, read on the driver's own connection in one call, decoded."""
        return [statement.record(row) for row in await self._fetch_raw(statement, values)]

    async def _fetch_raw(self, statement: _DriverStatement, values: Mapping[str, Any]) -> Sequence[Sequence[Any]]:
        """The statement's rows as the driver gives them, read on its own connection in one call."""
        sql, args = statement.sql, statement.args(values)
        async with self.engine.connect() as connection:
            driver: Any = (await connection.get_raw_connection()).driver_connection
            try:
                if self.engine.dialect.name == "sqlite":
                    return list(await driver.execute_fetchall(sql, args))
                found: Sequence[Sequence[Any]] = await driver.fetch(sql, *args)
                return found
            except _DRIVER_ERRORS as failure:
                await connection.invalidate()
                raise _driver_error(sql, args, failure) from failure

    async def _write_on_driver(self, statements: Sequence[tuple[str, Sequence[Sequence[Any]]]]) -> None:
        """Write statements, each run for each of its rows of parameters, in one transaction on the driver's
        own connection: on SQLite one trip to aiosqlite's thread (behind the process's writer lock); on
        PostgreSQL, when each has one row, one statement (`_together`) with no BEGIN or COMMIT around it,
        one round trip where a transaction of them takes one per statement and two more."""
        async with contextlib.AsyncExitStack() as held:
            if self._writer is not None:
                await held.enter_async_context(self._writer)
            connection = await held.enter_async_context(self.engine.connect())
            driver: Any = (await connection.get_raw_connection()).driver_connection
            try:
                if self.engine.dialect.name == "sqlite":
                    await sqlite_driver.execute_committed(driver, statements)
                elif all(len(rows) == 1 for _, rows in statements):
                    sql = _together(tuple(sql for sql, _ in statements))
                    await driver.execute(sql, *(value for _, (args,) in statements for value in args))
                else:
                    async with driver.transaction():
                        for sql, rows in statements:
                            await driver.executemany(sql, rows)
            except _DRIVER_ERRORS as failure:
                error = _driver_error(statements[0][0], statements[0][1], failure)
                if not isinstance(error, IntegrityError):
                    # Only a statement's refusal leaves the connection as it was (rolled back).
                    await connection.invalidate()
                raise error from failure

    async def apply(
        self,
        deployment_id: str,
        change: EventInput,
        outbox: OutboxFn | None = None,
        *,
        user_id: str | None = None,
    ) -> Change | None:
        """Applies a status change under the lifecycle rules.

        Returns None when the event was applied before (same event_id) or the record is closed.
        An event the lifecycle does not allow is logged without changing the record when it is
        older than the record's last change (it arrived late, after its successors), and raises
        TransitionRejected otherwise. Concurrent writers of one record are ordered by its
        revision: the loser reads again and retries.
        """
        while True:
            try:
                async with self.transaction() as session:
                    batch = _Batch(session)
                    applied = await self._apply_in(batch, deployment_id, change, outbox, user_id=user_id)
                    await batch.flush()
            except (IntegrityError, _Raced):
                # Another writer took this revision, or applied the same event: look again.
                continue
            self.outbox_written()
            return applied

    async def mutate(
        self,
        deployment_id: str,
        user_id: str | None,
        plan: Plan,
        outbox: OutboxFn | None = None,
        *,
        quotas: quota_rules.Quotas | None = None,
        demand: quota_rules.Usage | None = None,
    ) -> Change:
        """Applies an operation an owner asked for: `plan` reads the record as it is in the transaction
        (and raises to refuse), the change is written with its release and outbox rows.

        With quotas and `demand` (what the record will hold), the owner's other deployments and this
        demand together must fit, checked under the same per-user lock creates take.

        Operations that arrive while a group is being written wait, and are written together in the
        next transaction (group commit); each is answered as if written alone: a refusal (the plan's,
        the lifecycle's, a quota's) goes to its caller only.
        """
        done: asyncio.Future[Change] = asyncio.get_running_loop().create_future()
        self._mutations.append(
            _Mutating(deployment_id, user_id, plan, outbox, quotas, demand, contextvars.copy_context(), done)
        )
        if self._mutating is None or self._mutating.done():
            self._mutating = asyncio.create_task(self._mutate_groups())
        return await done

    async def _mutate_alone(self, member: _Mutating) -> Change:
        """One operation in its own transaction (after its group met a conflict), retried when raced."""
        while True:
            try:
                async with self.transaction() as session:
                    if member.checked:
                        row = await self.get(member.user_id, member.deployment_id)
                        if row is None:
                            raise RecordMissing(member.deployment_id)
                        await self._lock_user(session, row.user_id)
                        member.check(await self._usage(session, row.user_id), row)
                    applied = await self._mutate_in(
                        session, member.deployment_id, member.user_id, member.plan, member.outbox
                    )
            except (IntegrityError, _Raced):
                continue
            if member.outbox is not None:
                self.outbox_written()
            return applied

    async def _mutate_groups(self) -> None:
        """Writes the waiting operations, one group per transaction, until none wait."""
        while self._mutations:
            taken = self._mutations[:_GROUP_MOST]
            del self._mutations[:_GROUP_MOST]
            # A caller that gave up (its call was cancelled) is not written.
            group = [member for member in taken if not member.done.done()]
            if group:
                await self._mutate_group(group)

    async def _mutate_group(self, group: Sequence[_Mutating]) -> None:
        """Writes a group in one transaction and answers each caller; on a conflict (another writer
        took a revision, or an event id), each is written on its own, as if the group never was."""
        answers: list[Change | Exception] = []
        try:
            try:
                async with self.transaction() as session:
                    answers = await self._mutate_group_in(session, group)
            except (IntegrityError, _Raced):
                answers = []
                for member in group:
                    try:
                        answers.append(await asyncio.create_task(self._mutate_alone(member), context=member.context))
                    except Exception as refused:
                        answers.append(refused)
            else:
                wrote = zip(group, answers, strict=True)
                if any(isinstance(answer, Change) and member.outbox is not None for member, answer in wrote):
                    self.outbox_written()
        except Exception as failure:
            answers = [failure] * len(group)
        finally:
            for member, answer in itertools.zip_longest(group, answers):
                if member.done.done():
                    continue
                if answer is None:
                    # The writer itself was cancelled before it had an answer.
                    member.done.cancel()
                elif isinstance(answer, Exception):
                    member.done.set_exception(answer)
                else:
                    member.done.set_result(answer)

    async def _mutate_group_in(self, session: AsyncSession, group: Sequence[_Mutating]) -> list[Change | Exception]:
        """Checks and writes a group in order, as one operation after another would be: each sees the
        records as those before it left them; its answer is its change or why it was refused."""
        batch = _Batch(session)
        connection = await batch.connection()
        checking = any(member.checked for member in group)
        if checking and connection.dialect.name == "sqlite":
            # The database-wide write lock, before the reads (as _lock_users takes it).
            await self._lock_users(session, [])
        await batch.load([member.deployment_id for member in group])
        users = sorted(
            {
                row.user_id
                for member in group
                if member.checked and (row := batch.rows[member.deployment_id]) is not None
            }
        )
        used: dict[str, quota_rules.Usage] = {}
        if users:
            if connection.dialect.name != "sqlite":
                await self._lock_users(session, users)
            used = await self._usages(session, users)
        answers: list[Change | Exception] = []
        for member in group:
            row = batch.rows[member.deployment_id]
            try:
                if row is not None and row.user_id in used:
                    member.check(used[row.user_id], row)
                # In the caller's context: the outbox rows it writes keep the caller's trace. Run at
                # once, without a task of its own: a task would wait a turn of the event loop each.
                asked = (batch, member.deployment_id, member.user_id, member.plan, member.outbox)
                try:
                    applied = member.context.run(self._change_now, *asked)
                except _Reads:
                    applied = await asyncio.create_task(self._change_in(*asked), context=member.context)
            except (TransitionRejected, RecordMissing, ServiceError) as refused:
                # Refused before it wrote anything: the others in the group go on.
                answers.append(refused)
                continue
            if row is not None and row.user_id in used:
                # What the operations after it in the group see, as they would after its commit.
                used[row.user_id] = used[row.user_id] - quota_rules.held(row) + quota_rules.held(applied.row)
            answers.append(applied)
        await batch.flush()
        return answers

    async def _mutate_in(
        self, session: AsyncSession, deployment_id: str, user_id: str | None, plan: Plan, outbox: OutboxFn | None
    ) -> Change:
        batch = _Batch(session)
        applied = await self._change_in(batch, deployment_id, user_id, plan, outbox)
        await batch.flush()
        return applied

    async def _change_in(
        self, batch: _Batch, deployment_id: str, user_id: str | None, plan: Plan, outbox: OutboxFn | None
    ) -> Change:
        """Plans and writes an owner's operation on the record as `batch` has it; a refusal writes nothing."""
        await batch.load([deployment_id])
        row, change = self._planned(batch, deployment_id, user_id, plan)
        return await self._write(batch, row, change, outbox, late=False)

    def _change_now(
        self, batch: _Batch, deployment_id: str, user_id: str | None, plan: Plan, outbox: OutboxFn | None
    ) -> Change:
        """_change_in on a record the batch has read, without waiting; raises _Reads, having written
        nothing, when the change is a failed rollout (its rollback reads the releases)."""
        row, change = self._planned(batch, deployment_id, user_id, plan)
        verdict, failed = self._verdict(batch, row, change)
        if failed:
            raise _Reads
        return self._written(batch, row, change, outbox, late=False, moment=now(), verdict=verdict, release=None)

    @staticmethod
    def _planned(
        batch: _Batch, deployment_id: str, user_id: str | None, plan: Plan
    ) -> tuple[DeploymentRow, EventInput]:
        """The record as `batch` has it and the change `plan` makes of it, if the lifecycle allows it."""
        row = batch.rows[deployment_id]
        if row is None or row.deleted_at is not None or (user_id is not None and row.user_id != user_id):
            raise RecordMissing(deployment_id)
        change = plan(row)
        if not allowed(row.status, change.status, change.record.get("operation", row.operation)):
            raise TransitionRejected(row.status, change.status)
        return row, change

    async def release(self, deployment_id: str, number: int) -> ReleaseRow | None:
        found = await self._releases(
            select(ReleaseRow).where(ReleaseRow.deployment_id == deployment_id, ReleaseRow.number == number)
        )
        return found[0] if found else None

    async def last_healthy_release(self, deployment_id: str, before: int) -> ReleaseRow | None:
        """The newest release before `before` that ran healthy."""
        found = await self._releases(
            select(ReleaseRow)
            .where(ReleaseRow.deployment_id == deployment_id, ReleaseRow.number < before, ReleaseRow.healthy)
            .order_by(ReleaseRow.number.desc())
            .limit(1)
        )
        return found[0] if found else None

    async def releases(self, deployment_id: str, *, before: int | None, limit: int) -> list[ReleaseRow]:
        """A page of releases, newest first: at most `limit` numbered below `before`."""
        query = select(ReleaseRow).where(ReleaseRow.deployment_id == deployment_id)
        if before is not None:
            query = query.where(ReleaseRow.number < before)
        return await self._releases(query.order_by(ReleaseRow.number.desc()).limit(limit))

    async def _releases(self, query: Any) -> list[ReleaseRow]:
        """Releases with their specs: the current one's is read from its record, where it is kept."""
        async with self._sessions() as session:
            found = list((await session.scalars(query)).all())
            for release in found:
                if release.spec is None:
                    session.expunge(release)
                    release.spec = await session.scalar(
                        select(DeploymentRow.spec).where(DeploymentRow.id == release.deployment_id)
                    )
            return found

    async def adopted(self, location_id: str, namespace: str) -> str | None:
        """The live deployment that holds an adopted namespace, if one does."""
        async with self._sessions() as session:
            found: str | None = await session.scalar(
                select(DeploymentRow.id).where(
                    DeploymentRow.is_adopted,
                    DeploymentRow.target_location == location_id,
                    DeploymentRow.source_namespace == namespace,
                    DeploymentRow.deleted_at.is_(None),
                )
            )
            return found

    async def apply_batch(self, changes: Sequence[tuple[str, EventInput]]) -> list[Change | Exception | None]:
        """Applies reported changes in order in one transaction: one commit for many events.

        Each result is what apply would have returned, or the TransitionRejected or RecordMissing
        it would have raised. When another writer races it, each change is applied on its own.
        """
        try:
            async with self.transaction() as session:
                # Every record and every event id the batch names is read first, in two statements.
                batch = _Batch(session)
                await batch.load([deployment_id for deployment_id, _ in changes])
                await batch.look_up([change.event_id for _, change in changes])
                results: list[Change | Exception | None] = []
                for deployment_id, change in changes:
                    try:
                        results.append(await self._apply_in(batch, deployment_id, change, None))
                    except (TransitionRejected, RecordMissing) as refused:
                        # Refused before it wrote anything: the others in the batch go on.
                        results.append(refused)
                await batch.flush()
            # An event may have made requests of its own (a rollback, the delete after a migration).
            self.outbox_written()
            return results
        except (IntegrityError, _Raced):
            alone: list[Change | Exception | None] = []
            for deployment_id, change in changes:
                try:
                    alone.append(await self.apply(deployment_id, change))
                except (TransitionRejected, RecordMissing) as refused:
                    alone.append(refused)
            return alone

    async def _apply_in(
        self,
        batch: _Batch,
        deployment_id: str,
        change: EventInput,
        outbox: OutboxFn | None,
        *,
        user_id: str | None = None,
    ) -> Change | None:
        await batch.load([deployment_id])
        row = batch.rows[deployment_id]
        if row is None or (user_id is not None and row.user_id != user_id):
            raise RecordMissing(deployment_id)
        await batch.look_up([change.event_id])
        if change.event_id in batch.seen or row.deleted_at is not None:
            return None
        late = False
        if not allowed(row.status, change.status, row.operation):
            late = change.time is not None and change.time <= row.updated_at
            if not late:
                raise TransitionRejected(row.status, change.status, early=early(row.status, change.status))
        applied = await self._write(batch, row, change, outbox, late=late)
        if row.promoted_from is not None and not late:
            follow_up = await self._finish_promote(batch, applied)
            if follow_up is not None:
                applied = dataclasses.replace(applied, also=(follow_up,))
        return applied

    async def _finish_promote(self, batch: _Batch, copy: Change) -> Change | None:
        """Ends the promote or migration of the copy's source once the copy runs, failed or is gone."""
        row = copy.row
        assert row.promoted_from is not None
        healthy = row.status == "running" and row.healthy_release is not None
        if not (healthy or row.status in TERMINAL or row.deleted_at is not None):
            return None
        await batch.load([row.promoted_from])
        source = batch.rows[row.promoted_from]
        if (
            source is None
            or source.deleted_at is not None
            or source.promoted_to != row.id
            or source.operation not in ("promote", "migrate")
        ):
            return None
        outbox: OutboxFn | None = None
        if healthy and source.operation == "migrate":
            change = EventInput(
                event_id=f"api:{source.id}:migrated:{source.revision}",
                status="deleting",
                phase="delete_requested",
                message=f"migrated to {row.id} ({row.name}), which runs; the source is deleted",
                source="api",
                operation="delete",
                record={"operation": "delete"},
            )
            outbox = self.delete_outbox
        elif healthy:
            change = EventInput(
                event_id=f"api:{source.id}:promoted:{source.revision}",
                status="running",
                phase="promoted",
                message=f"promoted to {row.id} ({row.name}), which runs",
                source="api",
                operation=source.operation,
                record={"operation": None},
            )
        else:
            why = row.error_message or ("it was deleted" if row.deleted_at is not None else row.status)
            change = EventInput(
                event_id=f"api:{source.id}:promote-failed:{source.revision}",
                status="running",
                phase="promote_failed",
                message=f"the copy {row.id} did not come up ({why}); this deployment keeps running untouched",
                source="api",
                operation=source.operation,
                record={"operation": None, "promoted_to": None},
            )
        return await self._write(batch, source, change, outbox, late=False)

    async def _write(
        self, batch: _Batch, row: DeploymentRow, change: EventInput, outbox: OutboxFn | None, *, late: bool
    ) -> Change:
        """Writes the change: the record's update and its event are made by the batch's flush (the
        update lost to a concurrent writer: _Raced). The record after it is `row` with the values written."""
        moment = now()
        verdict: dict[str, Any] = {}
        release: ReleaseRow | None = None
        if not late:
            verdict, failed = self._verdict(batch, row, change)
            if failed:
                release = await self._rollback(batch, row, change, moment, verdict)
        return self._written(batch, row, change, outbox, late=late, moment=moment, verdict=verdict, release=release)

    def _written(
        self,
        batch: _Batch,
        row: DeploymentRow,
        change: EventInput,
        outbox: OutboxFn | None,
        *,
        late: bool,
        moment: datetime,
        verdict: dict[str, Any],
        release: ReleaseRow | None,
    ) -> Change:
        """_write once the verdict on the change is known (and the release a rollback makes): what is
        left touches only the batch, so it runs without waiting."""
        before = observed_of(row)
        values: dict[str, Any] = {"revision": row.revision + 1, "updated_at": moment}
        operation = change.operation if change.operation is not None else row.operation
        if not late:
            values.update(status=change.status, phase=change.phase)
            values.update({k: v for k, v in change.fields.items() if k in SETTABLE})
            if change.status == "pending":
                # A retry starts afresh: what the failed attempt reported no longer holds.
                values.update(error_message=None, cluster_error=None)
            if change.final:
                values.update(deleted_at=moment, live_name=None, operation=None)
            values.update(verdict)
            values.update(change.record)
            if change.new_release is not None:
                release = ReleaseRow(
                    deployment_id=row.id,
                    number=values["release"],
                    spec=None,
                    operation=change.new_release.operation,
                    actor=change.new_release.actor,
                    reason=change.new_release.reason,
                    created_at=moment,
                    healthy=False,
                    rollback_of=change.new_release.rollback_of,
                )
        message = change.message
        if values.get("operation") == "rollback" and change.release_failed:
            # The report that ended the rollout also says what the platform did about it.
            operation = "rollback"
            message = f"{change.message}; {values['error_message']}"
        after = {
            **before,
            **{name: v.isoformat() if isinstance(v, datetime) else v for name, v in values.items() if name in OBSERVED},
        }
        event = _plain(
            EventRow,
            dict(
                event_id=change.event_id,
                deployment_id=row.id,
                revision=row.revision + 1,
                status=change.status,
                phase=change.phase,
                message=message,
                source=change.source,
                simulated=change.simulated,
                final=change.final and not late,
                time=change.time or moment,
                actor=change.actor,
                operation=operation,
                release=change.release or values.get("release") or None,
                changes=changed(before, after),
            ),
        )
        spec_bytes = 0
        replaced = 0
        if "spec" in values:
            spec_bytes = _json_bytes(values["spec"]) - _json_bytes(row.spec)
            # The release being replaced keeps its spec from now on (the record holds the new one).
            batch.keep(row.id, row.release, row.spec)
            replaced = _json_bytes(row.spec)
        record_grew = _text_bytes(after) - _text_bytes(before) + spec_bytes
        # Releases are kept, and count with the history.
        history_grew = _event_bytes(event) + replaced
        if release is not None and release.seq is None:
            history_grew += _release_bytes(release)
        updated = _plain(
            DeploymentRow,
            {
                **columns_of(row, _RECORD_TABLE_COLUMNS),
                **values,
                "record_bytes": row.record_bytes + record_grew,
                "history_bytes": row.history_bytes + history_grew,
            },
        )
        batch.add(row, updated, values, (record_grew, history_grew), event)
        if release is not None and release.seq is None:
            batch.release(release)
        deployment = row_to_proto(updated)
        if outbox is not None:
            batch.outbox += _outbox_rows(outbox(updated, deployment), moment, updated.id)
        elif values.get("operation") == "rollback" and change.release_failed:
            batch.outbox += _outbox_rows(self.update_outbox(updated, deployment), moment, updated.id)
        return Change(updated, event, deployment)

    @staticmethod
    def _verdict(batch: _Batch, row: DeploymentRow, change: EventInput) -> tuple[dict[str, Any], bool]:
        """What a worker's report means for the desired state: an operation that ended, or a release
        that ran healthy (marked so by the batch's flush); and whether it is a failed rollout, which
        `_rollback` rolls back."""
        values: dict[str, Any] = {}
        if change.status in TERMINAL or (change.status == "stopped" and row.operation == "stop"):
            values["operation"] = None
        if change.release == 0 or change.release != row.release:
            return values, False
        if change.release_healthy:
            values.update(healthy_release=row.release, operation=None)
            batch.healthy.append((row.id, row.release))
            return values, False
        return values, change.release_failed and row.operation in ROLLOUTS

    async def _rollback(
        self, batch: _Batch, row: DeploymentRow, change: EventInput, moment: datetime, values: dict[str, Any]
    ) -> ReleaseRow | None:
        """A failed rollout, rolled back to the last healthy release: sets in `values` what that means for
        the record, and returns the new release it makes (None when there is nothing to go back to)."""
        session = batch.session
        why = change.fields.get("error_message") or change.message
        good = row.healthy_release
        # The releases this batch made or replaced are read below as written.
        await batch.write_releases()
        made_by = await session.scalar(
            select(ReleaseRow.operation).where(ReleaseRow.deployment_id == row.id, ReleaseRow.number == row.release)
        )
        if made_by == "rollback-automatic":
            # Going back did not work either: rolling back again would loop for ever.
            values.update(
                status="error",
                operation=None,
                error_message=f"the automatic rollback to release {good} (release {row.release}) failed too: {why}",
            )
            return None
        spec = (
            await session.scalar(
                select(ReleaseRow.spec).where(ReleaseRow.deployment_id == row.id, ReleaseRow.number == good)
            )
            if good is not None
            else None
        )
        if spec is None:
            values.update(operation=None, error_message=f"release {row.release} did not become healthy: {why}")
            return None
        number = row.release + 1
        message = (
            f"release {row.release} did not become healthy ({why}); rolled back to release {good} as release {number}"
        )
        demand = quota_rules.demand_of_spec(spec)
        values.update(
            spec=spec,
            release=number,
            operation="rollback",
            error_message=message,
            # Automation that undoes a rollback is what users complain of most: image updates wait.
            image_updates_paused=True,
            cpu_millis=demand.cpu_millis,
            memory_mb=demand.memory_mb,
            storage_gb=demand.storage_gb,
        )
        return ReleaseRow(
            deployment_id=row.id,
            number=number,
            spec=None,
            operation="rollback-automatic",
            actor=None,
            reason=message,
            created_at=moment,
            healthy=False,
            rollback_of=good,
        )

    async def events_after(self, deployment_id: str, revision: int, limit: int = 1000) -> list[EventRow]:
        async with self._sessions() as session:
            query = (
                select(EventRow)
                .where(EventRow.deployment_id == deployment_id, EventRow.revision > revision)
                .order_by(EventRow.revision)
                .limit(limit)
            )
            return list((await session.scalars(query)).all())

    async def history_after(
        self, deployment_id: str, revision: int, limit: int = 1000
    ) -> list[tuple[EventRow, pb.Deployment]]:
        """The logged changes after a revision, each with the Deployment exactly as it left it.

        Rebuilt from the record's spec and the observed fields folded from the oldest kept event
        (a complete base) up to each change's revision.
        """
        async with self._sessions() as session:
            row = await session.scalar(select(DeploymentRow).where(DeploymentRow.id == deployment_id))
            if row is None:
                return []
            query = (
                select(EventRow)
                .where(EventRow.deployment_id == deployment_id, EventRow.revision <= revision + limit)
                .order_by(EventRow.revision)
            )
            events = (await session.scalars(query)).all()
            states: list[tuple[EventRow, dict[str, Any]]] = []
            state: dict[str, Any] = {}
            for event in events:
                fold(state, event.changes)
                if event.revision > revision:
                    states.append((event, dict(state)))
            # Each change shows the spec of the release it was made under.
            numbers = {state.get("release") or 1 for _, state in states}
            specs: dict[int, dict[str, Any] | None] = dict(
                (
                    await session.execute(
                        select(ReleaseRow.number, ReleaseRow.spec).where(
                            ReleaseRow.deployment_id == deployment_id, ReleaseRow.number.in_(numbers)
                        )
                    )
                ).all()
            )
        return [
            # A release without a kept spec is the current one: its spec is the record's.
            (event, row_to_proto(row, state, event.revision, specs.get(state.get("release") or 1) or row.spec))
            for event, state in states
        ]

    async def purge_deleted(self, older_than: timedelta, batch: int = 500) -> int:
        """Removes the records and history of deployments whose teardown ended before `older_than` ago.

        Returns how many were removed; a batch per transaction, so a backlog never holds the writer long.
        """
        cutoff = now() - older_than
        removed = 0
        while True:
            async with self.transaction() as session:
                ids = list(
                    (
                        await session.scalars(
                            select(DeploymentRow.id).where(DeploymentRow.deleted_at < cutoff).limit(batch)
                        )
                    ).all()
                )
                if not ids:
                    return removed
                await session.execute(delete(EventRow).where(EventRow.deployment_id.in_(ids)))
                await session.execute(delete(ReleaseRow).where(ReleaseRow.deployment_id.in_(ids)))
                await session.execute(delete(DeploymentRow).where(DeploymentRow.id.in_(ids)))
            removed += len(ids)

    async def trim_events(self, keep: int, keep_bytes: int = HISTORY_BYTES) -> None:
        """Forgets the oldest events of each deployment past the newest `keep`, or past `keep_bytes`.

        The newest event is always kept, and the oldest kept one becomes a complete base: the
        changes before it are folded into it.
        """
        async with self._sessions() as session:
            by_count, by_bytes = long_histories(keep), heavy_histories(keep_bytes)
            heavy = {*(await session.scalars(by_count)).all(), *(await session.scalars(by_bytes)).all()}
        for deployment_id in heavy:
            async with self.transaction() as session:
                await self._trim(session, deployment_id, keep, keep_bytes)

    @staticmethod
    async def _trim(session: AsyncSession, deployment_id: str, keep: int, keep_bytes: int) -> None:
        connection = await session.connection()
        # The history must not change between its read and the rewrite of its base.
        if connection.dialect.name == "sqlite":
            await connection.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            await session.execute(select(DeploymentRow.id).where(DeploymentRow.id == deployment_id).with_for_update())
        query = select(EventRow).where(EventRow.deployment_id == deployment_id).order_by(EventRow.revision)
        events = list((await session.scalars(query)).all())
        sizes = [_event_bytes(event) for event in events]
        kept_bytes = sum(sizes)
        dropped = 0
        while dropped < len(events) - 1 and (len(events) - dropped > keep or kept_bytes > keep_bytes):
            kept_bytes -= sizes[dropped]
            dropped += 1
        if dropped == 0:
            if events:
                # Nothing to forget: the record leaves the look's index if a count brought it there.
                await session.execute(
                    update(DeploymentRow)
                    .where(DeploymentRow.id == deployment_id, DeploymentRow.events_from != events[0].revision)
                    .values(events_from=events[0].revision)
                )
            return
        base = events[dropped]
        state: dict[str, Any] = {}
        for event in events[: dropped + 1]:
            fold(state, event.changes)
        base.changes = state
        grown = _event_bytes(base) - sizes[dropped]
        await session.execute(
            delete(EventRow).where(EventRow.deployment_id == deployment_id, EventRow.revision < base.revision)
        )
        await session.execute(
            update(DeploymentRow)
            .where(DeploymentRow.id == deployment_id)
            .values(
                history_bytes=DeploymentRow.history_bytes - sum(sizes[:dropped]) + grown,
                events_from=base.revision,
            )
        )

    async def unsent(self, limit: int = UNSENT_MOST) -> list[Unsent]:
        """The oldest outbox rows, in the order written: one driver call, no transaction."""
        return [Unsent(**row) for row in await self._fetch(self._unsent, {"limit": limit})]

    async def mark_sent(self, rows: Sequence[Unsent]) -> None:
        """Forgets the rows JetStream stored: the stream holds them now, and keeps no second copy here.

        Matched by message id, never by seq: SQLite gives a new row the seq of a deleted last row, so
        when another replica's relay sent and deleted a row first, deleting by seq would drop a newer
        row that was never sent.
        """
        if not rows:
            return
        padded = _padded([row.id for row in rows])
        await self._write_on_driver([(_forget_statement(self.engine.dialect, len(padded)), [padded])])


class _Reads(Exception):
    """The change needs reads of its own in the transaction: it is made by the path that waits for them."""


class _Raced(Exception):
    """Another writer changed the record between this one's read and its write."""


class RecordMissing(Exception):
    pass


class TransitionRejected(Exception):
    """The lifecycle does not allow the change now; `early` when the changes before it are still on their way."""

    def __init__(self, current: str, new: str, *, early: bool = False) -> None:
        super().__init__(f"{current} → {new} is not a transition of the lifecycle")
        self.current = current
        self.new = new
        self.early = early


@dataclass
class RewrapCounts:
    deployments: int = 0
    releases: int = 0
    values: int = 0
    rewrapped: int = 0


async def rewrap_secrets(database_url: str, ring: secrets.KeyRing) -> RewrapCounts:
    """Wraps every stored secret value's data key (records and kept releases) with the key file's first key.

    The values' ciphertexts are not touched. A record is written only if it is still at the revision
    read, so a concurrent update is never overwritten (its new values are sealed by the first key anyway).
    """
    from apphosting import db

    counts = RewrapCounts()
    engine = db.make_engine(database_url)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    try:
        async with sessions() as session, session.begin():
            records = (
                await session.execute(select(DeploymentRow.id, DeploymentRow.revision, DeploymentRow.spec))
            ).all()
            for deployment_id, revision, spec in records:
                counts.values += sum(1 for e in secret_env.stored(spec or {}) if "envelope" in e)
                new = secret_env.rewrapped(spec or {}, ring)
                if new is None:
                    continue
                counts.rewrapped += _envelopes_changed(spec, new)
                result = await session.execute(
                    update(DeploymentRow)
                    .where(DeploymentRow.id == deployment_id, DeploymentRow.revision == revision)
                    .values(spec=new)
                )
                counts.deployments += result.rowcount  # type: ignore[attr-defined]
            releases = (
                await session.execute(
                    select(ReleaseRow.deployment_id, ReleaseRow.number, ReleaseRow.spec).where(
                        ReleaseRow.spec.is_not(None)
                    )
                )
            ).all()
            for deployment_id, number, spec in releases:
                counts.values += sum(1 for e in secret_env.stored(spec or {}) if "envelope" in e)
                new = secret_env.rewrapped(spec or {}, ring)
                if new is None:
                    continue
                counts.rewrapped += _envelopes_changed(spec, new)
                await session.execute(
                    update(ReleaseRow)
                    .where(ReleaseRow.deployment_id == deployment_id, ReleaseRow.number == number)
                    .values(spec=new)
                )
                counts.releases += 1
    finally:
        await engine.dispose()
    return counts


def _envelopes_changed(before: Mapping[str, Any], after: Mapping[str, Any]) -> int:
    old = {e["name"]: e.get("envelope") for e in secret_env.stored(before)}
    return sum(1 for e in secret_env.stored(after) if "envelope" in e and old.get(e["name"]) != e["envelope"])
