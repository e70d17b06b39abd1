"""Opaque page tokens for ListDeployments: a keyset position bound to the filter it was made for."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


class BadToken(ValueError):
    pass


def filter_key(statuses: Sequence[str], geographic_region: str) -> str:
    raw = json.dumps([sorted(set(statuses)), geographic_region])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def encode(before_seq: int, key: str) -> str:
    raw = json.dumps({"s": before_seq, "f": key}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(token: str, key: str) -> int:
    """The keyset position of a token; BadToken when it is corrupt or was made for another filter."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        position = data["s"]
        made_for = data["f"]
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise BadToken("page_token is not a token this service issued") from None
    if not isinstance(position, int) or position < 1:
        raise BadToken("page_token is not a token this service issued")
    if made_for != key:
        raise BadToken("page_token was issued for a different filter; list again from the first page")
    return position
