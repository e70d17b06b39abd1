"""Page sizes and opaque page tokens of the lists: a keyset position bound to the caller and filter, with a checksum."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Sequence
from typing import Final

from services.deployments import errors

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# A page stops early, with a token, before its rows reach this many bytes: a default gRPC client takes
# at most 4 MiB per message, and the rest of the answer (token, framing) needs far less than the margin.
MAX_PAGE_BYTES: Final = 3 * 1024 * 1024
# Positions are row sequence numbers: 64-bit signed integers on both databases.
MAX_POSITION: Final = 2**63 - 1
# A token is small; anything longer is refused before it is decoded.
MAX_TOKEN_CHARS: Final = 512
_CHECKSUM_BYTES: Final = 12
# Keeps the checksum of a page token apart from any other use of the same hash.
_CHECKSUM_TAG: Final = b"apphosting.v1.ListDeployments page_token\0"

_NOT_ISSUED: Final = "page_token is not a token this service issued; list again from the first page"


class BadToken(ValueError):
    pass


def page_size(requested: int) -> int:
    """A request's page_size as rows to answer: DEFAULT_PAGE_SIZE for 0, at most MAX_PAGE_SIZE; below 0 refused."""
    if requested < 0:
        raise errors.invalid_field("page_size", "page_size must be 0 (the default, 50) or more", "OUT_OF_RANGE")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def position(page_token: str, key: str) -> int | None:
    """Where a request's page_token says to go on (None: from the first page); refused naming page_token."""
    if not page_token:
        return None
    try:
        return decode(page_token, key)
    except BadToken as bad:
        raise errors.invalid_field("page_token", str(bad), "INVALID_PAGE_TOKEN") from None


def filter_key(caller: str, statuses: Sequence[str], geographic_region: str, show_deleted: bool = False) -> str:
    """What a token is bound to: the user listing and the filter of the listing."""
    raw = json.dumps([caller, sorted(set(statuses)), geographic_region, show_deleted])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _checksum(body: bytes) -> bytes:
    return hashlib.sha256(_CHECKSUM_TAG + body).digest()[:_CHECKSUM_BYTES]


def encode(before_seq: int, key: str) -> str:
    body = json.dumps({"s": before_seq, "f": key}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(_checksum(body) + body).decode().rstrip("=")


def decode(token: str, key: str) -> int:
    """The keyset position of a token; BadToken when it is edited, corrupt, out of range or another's.

    The checksum detects an edited token; it is not a secret, and need not be one: the position only
    says where a listing resumes among rows the caller may see anyway.
    """
    if len(token) > MAX_TOKEN_CHARS:
        raise BadToken(_NOT_ISSUED)
    try:
        raw = base64.urlsafe_b64decode((token + "=" * (-len(token) % 4)).encode("ascii"))
    except (binascii.Error, ValueError):
        raise BadToken(_NOT_ISSUED) from None
    checksum, body = raw[:_CHECKSUM_BYTES], raw[_CHECKSUM_BYTES:]
    if not hmac.compare_digest(checksum, _checksum(body)):
        raise BadToken(_NOT_ISSUED)
    try:
        data = json.loads(body)
    except ValueError:
        raise BadToken(_NOT_ISSUED) from None
    if not isinstance(data, dict) or set(data) != {"s", "f"}:
        raise BadToken(_NOT_ISSUED)
    position = data["s"]
    # bool is an int in Python; a position is a plain integer in the range of a row sequence number.
    if type(position) is not int or not 1 <= position <= MAX_POSITION:
        raise BadToken(_NOT_ISSUED)
    if data["f"] != key:
        raise BadToken("page_token was issued to another caller or for another filter; list again from the first page")
    return position
