"""The app's health check: the config key naming its HTTP path, and what such a path may be."""

from __future__ import annotations

from typing import Final

# The deployment config key naming the HTTP path the probes ask; without it they open a TCP connection.
CHECK_PATH_KEY: Final = "health_check_path"
CHECK_PATH_MAX_CHARS: Final = 1024


def check_path_problem(value: object) -> str | None:
    """Why a config value cannot be the health check path; None when it can (None itself: a TCP check)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        return "must be a non-empty string: an HTTP path such as /healthz"
    if not value.startswith("/"):
        return f"must be an absolute HTTP path starting with /, such as /healthz; got {value[:64]!r}"
    if len(value) > CHECK_PATH_MAX_CHARS:
        return f"must be at most {CHECK_PATH_MAX_CHARS} characters, got {len(value)}"
    if any(char.isspace() or ord(char) < 32 or ord(char) == 127 for char in value):
        return "must not contain spaces or control characters"
    return None
