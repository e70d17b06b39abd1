"""Envelope encryption of secret environment values, with keys from a key file.

Each value is encrypted with a fresh 256-bit data key (AES-256-GCM; the deployment id and the
variable's name are its associated data, so an envelope cannot be moved to another deployment or
name). The data key is wrapped (RFC 3394 AES key wrap) by a key-encryption key from the key file.

The key file is JSON: ``{"keys": [{"id": "...", "key": "<base64 of 32 bytes>"}, ...]}``. The first
key seals; every key opens. Rotation: add a new key first, run ``apphosting secrets rewrap`` (every
stored data key is wrapped again by the first key; the values' ciphertexts are not touched), then
remove the old key.

An envelope is ASCII text, ``v1.<key id>.<wrapped data key>.<nonce>.<ciphertext>`` (URL-safe
base64 parts): it is stored as text in a spec and carried as bytes on the bus.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets as random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from apphosting import CannotStart

_VERSION = "v1"
_KEY_BYTES = 32
_NONCE_BYTES = 12
# A key id: short, and free of the envelope's separator.
KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class SecretKeyError(Exception):
    """The key file is missing or malformed, lacks the key an envelope needs, or an envelope does not open."""


@dataclass(frozen=True)
class KeyRing:
    """The keys of a key file, in its order: the first seals, all open."""

    keys: tuple[tuple[str, bytes], ...]
    path: str = ""

    @property
    def sealing_id(self) -> str:
        return self.keys[0][0]

    def _key(self, key_id: str) -> bytes:
        for known, key in self.keys:
            if known == key_id:
                return key
        where = f" {self.path}" if self.path else ""
        raise SecretKeyError(
            f"the key file{where} has no key {key_id!r} (it has {', '.join(k for k, _ in self.keys)}): "
            "a value sealed by a removed key cannot be opened; restore that key, or set the value again"
        )

    def seal(self, value: str, deployment_id: str, name: str) -> str:
        """The envelope of `value` for variable `name` of deployment `deployment_id`."""
        key_id, kek = self.keys[0]
        data_key = AESGCM.generate_key(bit_length=_KEY_BYTES * 8)
        nonce = os.urandom(_NONCE_BYTES)
        ciphertext = AESGCM(data_key).encrypt(nonce, value.encode(), _associated(deployment_id, name))
        wrapped = aes_key_wrap(kek, data_key)
        return ".".join((_VERSION, key_id, _b64(wrapped), _b64(nonce), _b64(ciphertext)))

    def open(self, envelope: str | bytes, deployment_id: str, name: str) -> str:
        """The value an envelope holds; SecretKeyError when it cannot be opened here."""
        key_id, wrapped, nonce, ciphertext = _parse(envelope)
        data_key = self._unwrap(key_id, wrapped)
        try:
            plain = AESGCM(data_key).decrypt(nonce, ciphertext, _associated(deployment_id, name))
        except InvalidTag:
            raise SecretKeyError(
                f"the envelope of {name!r} does not open for deployment {deployment_id}: "
                "it was sealed for another deployment or name, or it was altered"
            ) from None
        return plain.decode()

    def rewrap(self, envelope: str) -> str:
        """The envelope with its data key wrapped by the sealing key; the ciphertext is unchanged."""
        key_id, wrapped, nonce, ciphertext = _parse(envelope)
        if key_id == self.sealing_id:
            return envelope
        data_key = self._unwrap(key_id, wrapped)
        sealing_id, kek = self.keys[0]
        return ".".join((_VERSION, sealing_id, _b64(aes_key_wrap(kek, data_key)), _b64(nonce), _b64(ciphertext)))

    def _unwrap(self, key_id: str, wrapped: bytes) -> bytes:
        try:
            return aes_key_unwrap(self._key(key_id), wrapped)
        except InvalidUnwrap:
            raise SecretKeyError(
                f"key {key_id!r} of the key file does not unwrap this envelope's data key: "
                "the key file's key of that id differs from the one that sealed it"
            ) from None


def key_id_of(envelope: str | bytes) -> str:
    """The id of the key that wraps an envelope's data key."""
    return _parse(envelope)[0]


def load(path: str | os.PathLike[str]) -> KeyRing:
    """The key ring of a key file; SecretKeyError saying what is wrong with it."""
    where = str(path)
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise SecretKeyError(
            f"secret key file {where} does not exist; make one with `apphosting secrets new-key-file {where}`"
        ) from None
    except OSError as failure:
        raise SecretKeyError(f"secret key file {where} cannot be read: {failure.strerror}") from None
    try:
        document = json.loads(text)
    except ValueError:
        raise SecretKeyError(f'secret key file {where} is not JSON ({{"keys": [{{"id": ..., "key": ...}}]}})') from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise SecretKeyError(f'secret key file {where} must hold "keys": a non-empty list of {{"id", "key"}}')
    keys: list[tuple[str, bytes]] = []
    for index, entry in enumerate(entries):
        key_id = entry.get("id") if isinstance(entry, dict) else None
        encoded = entry.get("key") if isinstance(entry, dict) else None
        if not isinstance(key_id, str) or not KEY_ID.fullmatch(key_id):
            raise SecretKeyError(f"secret key file {where}: keys[{index}].id must match {KEY_ID.pattern}")
        if any(key_id == known for known, _ in keys):
            raise SecretKeyError(f"secret key file {where}: keys[{index}].id {key_id!r} is used twice")
        try:
            key = base64.b64decode(encoded, validate=True) if isinstance(encoded, str) else b""
        except ValueError:
            key = b""
        if len(key) != _KEY_BYTES:
            raise SecretKeyError(
                f"secret key file {where}: keys[{index}].key must be the base64 of {_KEY_BYTES} random bytes"
            )
        keys.append((key_id, key))
    return KeyRing(tuple(keys), where)


def load_for_start(path: str | None) -> KeyRing | None:
    """The key ring a process is started with (None without a key file); CannotStart saying what is wrong."""
    if not path:
        return None
    try:
        return load(path)
    except SecretKeyError as failure:
        raise CannotStart(str(failure)) from None


def new_key() -> tuple[str, bytes]:
    """A fresh key and an id for it."""
    return f"k{random.token_hex(6)}", AESGCM.generate_key(bit_length=_KEY_BYTES * 8)


def write_key_file(path: str | os.PathLike[str], keys: Sequence[tuple[str, bytes]]) -> None:
    """Writes a key file (owner-only permissions) holding `keys`, the first the sealing one."""
    document = {"keys": [{"id": key_id, "key": base64.b64encode(key).decode()} for key_id, key in keys]}
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(target.name + ".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(json.dumps(document, indent=2) + "\n")
    os.replace(temporary, target)


def new_key_file(path: str | os.PathLike[str]) -> str:
    """Makes a key file with one fresh key; refuses to overwrite one. Returns the key's id."""
    if Path(path).exists():
        raise SecretKeyError(f"{path} already exists; add a key to it with `apphosting secrets add-key {path}`")
    key_id, key = new_key()
    write_key_file(path, [(key_id, key)])
    return key_id


def add_key(path: str | os.PathLike[str]) -> str:
    """Puts a fresh key first in an existing key file (it seals from now on); returns its id."""
    ring = load(path)
    key_id, key = new_key()
    write_key_file(path, [(key_id, key), *ring.keys])
    return key_id


def _associated(deployment_id: str, name: str) -> bytes:
    return f"apphosting-secret-env\x00{deployment_id}\x00{name}".encode()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _parse(envelope: str | bytes) -> tuple[str, bytes, bytes, bytes]:
    text = envelope.decode("ascii", "replace") if isinstance(envelope, bytes) else envelope
    parts = text.split(".")
    if len(parts) != 5 or parts[0] != _VERSION or not KEY_ID.fullmatch(parts[1]):
        raise SecretKeyError("not a sealed secret envelope (expected v1.<key id>.<data key>.<nonce>.<ciphertext>)")
    try:
        return parts[1], _unb64(parts[2]), _unb64(parts[3]), _unb64(parts[4])
    except ValueError:
        raise SecretKeyError("a sealed secret envelope has a part that is not base64") from None
