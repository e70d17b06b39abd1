"""Where the API is and how to reach it: from arguments, the environment (APPHOSTING_*) or a file."""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_ADDRESS = "127.0.0.1:50051"


@dataclass(frozen=True)
class ClientConfig:
    """The API's address (host:port), the bearer token, and TLS (a CA file, or plaintext when off)."""

    address: str = DEFAULT_ADDRESS
    token: str | None = None
    tls: bool = False
    ca_file: str | None = None
    # Seconds one call may take; watches are not bounded by it.
    timeout: float = 30.0

    @classmethod
    def from_env(cls, **overrides: object) -> ClientConfig:
        """APPHOSTING_ADDR, APPHOSTING_TOKEN (or APPHOSTING_TOKEN_FILE), APPHOSTING_TLS, APPHOSTING_CA;
        arguments given (not None) win."""
        token = os.environ.get("APPHOSTING_TOKEN")
        token_file = os.environ.get("APPHOSTING_TOKEN_FILE")
        if token is None and token_file:
            with open(token_file, encoding="utf-8") as handle:
                token = handle.read().strip()
        values: dict[str, object] = {
            "address": os.environ.get("APPHOSTING_ADDR", DEFAULT_ADDRESS),
            "token": token,
            "tls": os.environ.get("APPHOSTING_TLS", "").lower() in ("1", "true", "yes"),
            "ca_file": os.environ.get("APPHOSTING_CA") or None,
        }
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)  # type: ignore[arg-type]
