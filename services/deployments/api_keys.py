"""API keys for automation: made, listed and revoked by their owner, and verified on each call that carries one.

A key is `ahk_` and 32 random bytes (secrets.token_urlsafe: 43 characters, 256 bits). It is shown once,
in CreateApiKey's answer, and stored only as its SHA-256. A fast, unsalted hash is right here, unlike for
passwords: a password is guessable, so its hash must be slow and salted to make each guess expensive; a
key holds 256 random bits, so no guess has a chance whatever the hash costs, and a salt would defend
against precomputed tables that cannot exist for such a space. A fast hash also lets every call find its
key by an indexed equality lookup, which (unlike comparing secrets one by one) reveals nothing through
timing: the attacker cannot steer the hash of what they send.

Keys act as the user who made them, never as an admin (a key outlives the session that made it, and the
admin claim belongs to a token). A key may list keys, but only a token session may create or revoke
them: a leaked key cannot make itself a successor or revoke its owner's other keys.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import secrets
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeVar

import grpc
from sqlalchemy import func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from apphosting.v1 import api_keys_pb2 as pb
from apphosting.v1 import api_keys_pb2_grpc
from services.deployments import errors, paging
from services.deployments.auth import Caller, JwtVerifier, current_caller
from services.deployments.convert import timestamp
from services.deployments.store import DeploymentStore
from services.deployments.tables import ApiKeyRow

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")

KEY_PREFIX: Final = "ahk_"
# Characters of the secret shown in `prefix` to tell keys apart (48 of its 256 bits).
PREFIX_CHARS: Final = 8
SECRET_BYTES: Final = 32
MAX_NAME_CHARS: Final = 100
# Two years: a key that must live longer is rotated, not made immortal by a typo; 0 still means never.
MAX_TTL_SECONDS: Final = 2 * 365 * 24 * 3600
# Live (neither revoked nor expired) keys a user may hold.
MAX_LIVE_KEYS: Final = 100
# last_used_time is written at most this often per key: a busy key costs one write a minute, not one a call.
LAST_USED_RESOLUTION: Final = timedelta(minutes=1)
# First key of the PostgreSQL advisory locks that serialise one user's key creates (the live-key cap).
_KEYS_LOCK_SPACE: Final = 0x61706B79  # "apky"

Spawn = Callable[[Coroutine[Any, Any, None]], None]


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(SECRET_BYTES)


def key_hash(key: str) -> str:
    """What is stored of a key: the hex SHA-256 of all of it (see the module's docstring for why SHA-256)."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_prefix(key: str) -> str:
    return key[: len(KEY_PREFIX) + PREFIX_CHARS]


def _now() -> datetime:
    return datetime.now(UTC)


def _live(now: datetime) -> Any:
    return ApiKeyRow.revoked_at.is_(None) & or_(ApiKeyRow.expires_at.is_(None), ApiKeyRow.expires_at > now)


class ApiKeyStore:
    """The api_keys table, written through the deployment store's transactions (one SQLite writer at a time)."""

    def __init__(self, store: DeploymentStore) -> None:
        self._store = store

    async def create(
        self, user_id: str, name: str, *, read_only: bool, ttl: timedelta | None, now: datetime, limit: int
    ) -> tuple[ApiKeyRow, str] | None:
        """A new key and its secret; None when the user already holds `limit` live keys."""
        key = new_key()
        async with self._store.transaction() as session:
            await _lock_user(session, user_id)
            live = await session.scalar(
                select(func.count()).select_from(ApiKeyRow).where(ApiKeyRow.user_id == user_id, _live(now))
            )
            if (live or 0) >= limit:
                return None
            row = ApiKeyRow(
                id=str(uuid.uuid4()),
                user_id=user_id,
                name=name,
                prefix=key_prefix(key),
                key_hash=key_hash(key),
                read_only=read_only,
                created_at=now,
                expires_at=now + ttl if ttl is not None else None,
            )
            session.add(row)
        return row, key

    async def page(self, user_id: str, *, before_seq: int | None, limit: int) -> list[ApiKeyRow]:
        query = select(ApiKeyRow).where(ApiKeyRow.user_id == user_id)
        if before_seq is not None:
            query = query.where(ApiKeyRow.seq < before_seq)
        async with self._store.session() as session:
            return list((await session.scalars(query.order_by(ApiKeyRow.seq.desc()).limit(limit))).all())

    async def revoke(self, user_id: str, key_id: str, now: datetime) -> ApiKeyRow | None:
        """Revokes the user's key (a revoked one keeps its first revoke time); None when the user has no such key."""
        async with self._store.transaction() as session:
            row = await session.scalar(select(ApiKeyRow).where(ApiKeyRow.id == key_id, ApiKeyRow.user_id == user_id))
            if row is not None and row.revoked_at is None:
                row.revoked_at = now
            return row

    async def find(self, hashed: str) -> ApiKeyRow | None:
        async with self._store.session() as session:
            row: ApiKeyRow | None = await session.scalar(select(ApiKeyRow).where(ApiKeyRow.key_hash == hashed))
            return row

    async def touch(self, key_id: str, now: datetime) -> None:
        """Records a use, unless one was recorded within LAST_USED_RESOLUTION (by this replica or another)."""
        async with self._store.transaction() as session:
            await session.execute(
                update(ApiKeyRow)
                .where(
                    ApiKeyRow.id == key_id,
                    or_(ApiKeyRow.last_used_at.is_(None), ApiKeyRow.last_used_at <= now - LAST_USED_RESOLUTION),
                )
                .values(last_used_at=now)
            )


async def _lock_user(session: AsyncSession, user_id: str) -> None:
    """Holds, until the transaction ends, a lock every key create of this user takes: two concurrent creates
    cannot both fit under the cap."""
    connection = await session.connection()
    if connection.dialect.name == "sqlite":
        await connection.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        await connection.execute(select(func.pg_advisory_xact_lock(_KEYS_LOCK_SPACE, func.hashtext(user_id))))


def to_proto(row: ApiKeyRow) -> pb.ApiKey:
    key = pb.ApiKey(
        id=row.id,
        user_id=row.user_id,
        name=row.name,
        prefix=row.prefix,
        read_only=row.read_only,
        create_time=timestamp(row.created_at),
    )
    if row.expires_at is not None:
        key.expire_time.CopyFrom(timestamp(row.expires_at))
    if row.last_used_at is not None:
        key.last_used_time.CopyFrom(timestamp(row.last_used_at))
    if row.revoked_at is not None:
        key.revoke_time.CopyFrom(timestamp(row.revoked_at))
    return key


def _page_key(user_id: str) -> str:
    """What a ListApiKeys page token is bound to: the listing user (a deployments token never fits)."""
    return hashlib.sha256(json.dumps(["ListApiKeys", user_id]).encode()).hexdigest()[:16]


def _name(value: str) -> str:
    name = value.strip()
    if not name:
        raise errors.invalid_field(
            "name", "name is required: say what the key is for (ci, nightly-deploys)", "REQUIRED"
        )
    if len(name) > MAX_NAME_CHARS:
        raise errors.invalid_field(
            "name", f"name has {len(name)} characters; at most {MAX_NAME_CHARS} are allowed", "TOO_LONG"
        )
    if not name.isprintable():
        raise errors.invalid_field("name", "name must not contain control characters", "INVALID_FORMAT")
    return name


def _ttl(seconds: int) -> timedelta | None:
    if not 0 <= seconds <= MAX_TTL_SECONDS:
        raise errors.invalid_field(
            "ttl_seconds",
            f"ttl_seconds must be 0 (never expires) to {MAX_TTL_SECONDS} (two years); got {seconds}",
            "OUT_OF_RANGE",
        )
    return timedelta(seconds=seconds) if seconds else None


def _key_id(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise errors.invalid_field(
            "id", f"id must be an API key's id (a UUID); got {errors.echo(value)}", "INVALID_FORMAT"
        ) from None


def _answered(
    method: Callable[[ApiKeyServicer, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]],
) -> Callable[[ApiKeyServicer, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]:
    """A database failure is UNAVAILABLE (retry), not INTERNAL."""

    @functools.wraps(method)
    async def wrapper(self: ApiKeyServicer, request: Req, context: grpc.aio.ServicerContext[Req, Resp]) -> Resp:
        try:
            return await method(self, request, context)
        except errors.DATABASE_FAILURES as failure:
            log.warning("database unavailable in %s: %s", method.__name__, failure)
            raise errors.unavailable("the database") from None

    return wrapper


def _manager(method: str) -> Caller:
    """The caller, who must not be using an API key: keys are made and revoked from a token session."""
    caller = current_caller()
    if caller.api_key is not None:
        raise errors.keys_by_key(method)
    return caller


class ApiKeyServicer(api_keys_pb2_grpc.ApiKeyServiceServicer):
    """ApiKeyService: each caller sees and revokes only their own keys (an admin too)."""

    def __init__(self, keys: ApiKeyStore, *, max_live_keys: int = MAX_LIVE_KEYS) -> None:
        self._keys = keys
        self._max_live_keys = max_live_keys

    @_answered
    async def CreateApiKey(
        self,
        request: pb.CreateApiKeyRequest,
        context: grpc.aio.ServicerContext[pb.CreateApiKeyRequest, pb.CreateApiKeyResponse],
    ) -> pb.CreateApiKeyResponse:
        caller = _manager("CreateApiKey")
        violations: list[errors.FieldViolation] = []
        name, ttl = "", None
        try:
            name = _name(request.name)
        except errors.ServiceError as bad:
            violations.extend(bad.violations)
        try:
            ttl = _ttl(request.ttl_seconds)
        except errors.ServiceError as bad:
            violations.extend(bad.violations)
        if violations:
            raise errors.invalid_argument(violations)
        made = await self._keys.create(
            caller.user_id, name, read_only=request.read_only, ttl=ttl, now=_now(), limit=self._max_live_keys
        )
        if made is None:
            raise errors.api_key_limit(self._max_live_keys)
        row, key = made
        log.info("user %s made API key %s (%s)", caller.user_id, row.id, row.prefix)
        return pb.CreateApiKeyResponse(api_key=to_proto(row), key=key)

    @_answered
    async def ListApiKeys(
        self,
        request: pb.ListApiKeysRequest,
        context: grpc.aio.ServicerContext[pb.ListApiKeysRequest, pb.ListApiKeysResponse],
    ) -> pb.ListApiKeysResponse:
        size = paging.page_size(request.page_size)
        caller = current_caller()
        page_key = _page_key(caller.user_id)
        cursor = paging.position(request.page_token, page_key)
        # One row more than the page: whether there is a next page, without a second query.
        rows = await self._keys.page(caller.user_id, before_seq=cursor, limit=size + 1)
        response = pb.ListApiKeysResponse(api_keys=[to_proto(row) for row in rows[:size]])
        if len(rows) > size:
            response.next_page_token = paging.encode(rows[size - 1].seq, page_key)
        return response

    @_answered
    async def RevokeApiKey(
        self,
        request: pb.RevokeApiKeyRequest,
        context: grpc.aio.ServicerContext[pb.RevokeApiKeyRequest, pb.ApiKey],
    ) -> pb.ApiKey:
        caller = _manager("RevokeApiKey")
        key_id = _key_id(request.id)
        # Another user's key is not found, with the very answer an unknown id gets.
        row = await self._keys.revoke(caller.user_id, key_id, _now())
        if row is None:
            raise errors.api_key_not_found(key_id)
        log.info("user %s revoked API key %s (%s)", caller.user_id, row.id, row.prefix)
        return to_proto(row)


class ApiKeyVerifier(JwtVerifier):
    """Checks `Bearer ahk_...` against the api_keys table; in a VerifierChain beside the token verifiers.

    Nothing is cached: a revoke in any replica takes effect on the very next call. A use is recorded
    in the background (`spawn`), so no call waits for a write; at most once per LAST_USED_RESOLUTION.
    """

    def __init__(self, keys: ApiKeyStore, spawn: Spawn, *, clock: Callable[[], datetime] = _now) -> None:
        super().__init__(None, [])
        self._keys = keys
        self._spawn = spawn
        self._clock = clock
        # Keys whose use is being written: a burst of calls schedules one write, not one each.
        self._touching: set[str] = set()

    def issuers(self) -> frozenset[str | None]:
        return frozenset()

    def recognizes(self, token: str) -> bool:
        return token.startswith(KEY_PREFIX)

    def verify(self, token: str) -> Caller:
        raise errors.unauthenticated("TOKEN_INVALID", "API keys are checked only by the API server")

    async def verify_async(self, token: str) -> Caller:
        prefix = errors.echo(key_prefix(token), len(KEY_PREFIX) + PREFIX_CHARS)
        try:
            row = await self._keys.find(key_hash(token))
        except errors.DATABASE_FAILURES as failure:
            log.warning("API key %s not checked, database unavailable: %s", prefix, failure)
            raise errors.unavailable("the database") from None
        if row is None:
            raise errors.unauthenticated("TOKEN_INVALID", f"API key {prefix} is not a key of this service")
        now = self._clock()
        if row.revoked_at is not None:
            raise errors.unauthenticated(
                "TOKEN_REVOKED", f"API key {row.prefix} was revoked at {row.revoked_at.isoformat()}; use another key"
            )
        if row.expires_at is not None and row.expires_at <= now:
            raise errors.unauthenticated(
                "TOKEN_EXPIRED", f"API key {row.prefix} expired at {row.expires_at.isoformat()}; make a new one"
            )
        if (
            row.last_used_at is None or now - row.last_used_at >= LAST_USED_RESOLUTION
        ) and row.id not in self._touching:
            self._touching.add(row.id)
            self._spawn(self._touch(row.id, now))
        return Caller(row.user_id, api_key=row.prefix, read_only=row.read_only)

    async def _touch(self, key_id: str, now: datetime) -> None:
        try:
            await self._keys.touch(key_id, now)
        except Exception as exc:
            log.warning("last use of API key %s not recorded: %s", key_id, exc)
        finally:
            self._touching.discard(key_id)
