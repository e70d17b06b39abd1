"""Structured logging: JSON lines or console lines naming deployment, request and trace; secrets redacted."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
import sys
from datetime import UTC, datetime
from typing import IO, Any, Literal

from opentelemetry import trace

Format = Literal["json", "console"]
FORMATS: tuple[Format, ...] = ("json", "console")

# What the line is about; set by the gRPC call's interceptor and by the bus consumer from the message's headers.
_deployment_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("apphosting_deployment_id", default=None)
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("apphosting_request_id", default=None)

_SERVER_COMMANDS = ("api", "scheduler", "provisioner", "dev", "rest", "migrate")
_process: str | None = None


def process_name() -> str:
    """The process's name in logs and traces: what configure() was told, else the server command it runs."""
    global _process
    if _process is None:
        command = sys.argv[1] if len(sys.argv) > 1 else ""
        _process = command if command in _SERVER_COMMANDS else os.path.basename(sys.argv[0] or "python")
    return _process


def deployment_id() -> str | None:
    return _deployment_id.get()


def request_id() -> str | None:
    return _request_id.get()


def bind(*, deployment_id: str | None = None, request_id: str | None = None) -> None:
    """Says what the current task's lines are about from here on (an empty or None value leaves it as is)."""
    if deployment_id:
        _deployment_id.set(deployment_id)
    if request_id:
        _request_id.set(request_id)


class _Bound:
    """What `bound` returns: a plain object rather than a generator, since a call's stream holds it for its life."""

    __slots__ = ("_deployment_id", "_request_id", "_tokens")

    def __init__(self, deployment_id: str | None, request_id: str | None) -> None:
        self._deployment_id = deployment_id
        self._request_id = request_id
        self._tokens: tuple[contextvars.Token[str | None] | None, contextvars.Token[str | None] | None] = (None, None)

    def __enter__(self) -> None:
        self._tokens = (
            _deployment_id.set(self._deployment_id) if self._deployment_id else None,
            _request_id.set(self._request_id) if self._request_id else None,
        )

    def __exit__(self, *_: object) -> None:
        deployment_token, request_token = self._tokens
        # A token made in another context (a generator resumed elsewhere) cannot be reset; keep going.
        with contextlib.suppress(ValueError):
            if request_token is not None:
                _request_id.reset(request_token)
            if deployment_token is not None:
                _deployment_id.reset(deployment_token)


def bound(*, deployment_id: str | None = None, request_id: str | None = None) -> _Bound:
    """Says what the lines logged inside are about; the previous values come back on exit."""
    return _Bound(deployment_id, request_id)


_REDACTED = "[REDACTED]"
# Each pattern keeps its first group (what the value belongs to) and drops what follows.
_SECRETS: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)", re.DOTALL),
        _REDACTED,
    ),
    # An Authorization header's value, whatever its scheme says.
    # (at least 12 characters, so "the bearer token is invalid" is left alone).
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{12,}"), rf"\1 {_REDACTED}"),
    # JWTs wherever they appear: header and payload are base64url JSON, so they start with "eyJ".
    (re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), _REDACTED),
    # NATS nkey seeds (user, account, operator, server seeds start with S and the key type).
    (re.compile(r"\bS[UAONC][A-Z2-7]{56}\b"), _REDACTED),
    # Passwords in URLs: scheme://user:password@host.
    (re.compile(r"(://[^:/@\s]+:)[^@/\s]+@"), rf"\1{_REDACTED}@"),
    # name=value, name: value, "name": "value" for names that say secret.
    (
        re.compile(
            r"""(?ix)
            ( \b[\w.-]*(?:password|passwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|
                 authorization|credentials?|client-key-data|nkey|seed|cookie)[\w.-]*
              ["']? \s* [:=] \s* ["']? )
            (?!\[REDACTED\])[^\s"',;&}]+
            """
        ),
        rf"\1{_REDACTED}",
    ),
)


# A request that carries secret environment values, in any form it could be printed in (protobuf
# text, JSON with either field name, the CLI's flag): every `value` after the mention is redacted.
_SECRET_ENV = re.compile(r"(?i)secret_environment_variables|secretEnvironmentVariables|--secret-env\b")
_SECRET_ENV_VALUE = re.compile(
    r"""(?x)
    ( \bvalue ["']? \s* [:=] \s* )
    (?!\[REDACTED\])
    ( "(?:[^"\\]|\\.)*" | '(?:[^'\\]|\\.)*' | [^\s,}\]]+ )
    """
)
# The CLI's --secret-env NAME=value: the value after the name.
_SECRET_ENV_FLAG = re.compile(r"(--secret-env[=\s]+[A-Za-z_][A-Za-z0-9_]*=)(?!\[REDACTED\])\S+")


def redact(text: str) -> str:
    """The text with tokens, JWTs, keys and secret-looking values replaced by [REDACTED]."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    mention = _SECRET_ENV.search(text)
    if mention is not None:
        head, tail = text[: mention.start()], text[mention.start() :]
        tail = _SECRET_ENV_FLAG.sub(rf"\1{_REDACTED}", tail)
        text = head + _SECRET_ENV_VALUE.sub(rf"\1{_REDACTED}", tail)
    return text


class RedactFilter(logging.Filter):
    """Rewrites each record's message (and traceback) with its secrets redacted, before any formatter sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            message = f"{record.msg} {record.args}"
        record.msg = redact(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class ContextFilter(logging.Filter):
    """Adds the process, deployment, request and trace of the moment to each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.process_name = process_name()
        record.deployment_id = _deployment_id.get()
        record.request_id = _request_id.get()
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = format(context.trace_id, "032x")
            record.span_id = format(context.span_id, "016x")
        else:
            record.trace_id = None
            record.span_id = None
        return True


_CONTEXT_FIELDS = ("deployment_id", "request_id", "trace_id", "span_id")


def _time(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, process, logger, message, then what the line is about."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _time(record),
            "level": record.levelname,
            "process": getattr(record, "process_name", None) or process_name(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value:
                line[name] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(self.formatException(record.exc_info))
        if record.exc_text:
            line["exception"] = record.exc_text
        return json.dumps(line, ensure_ascii=False, default=str)


class ConsoleFormatter(logging.Formatter):
    """A line for people at a terminal: time, level, process, logger, message, then what it is about."""

    def format(self, record: logging.LogRecord) -> str:
        about = " ".join(
            f"{name.removesuffix('_id')}={value}"
            for name in ("deployment_id", "request_id", "trace_id")
            if (value := getattr(record, name, None))
        )
        text = (
            f"{_time(record)} {record.levelname:<7} {getattr(record, 'process_name', None) or process_name()} "
            f"{record.name}: {record.getMessage()}"
        )
        if about:
            text = f"{text}  [{about}]"
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(self.formatException(record.exc_info))
        if record.exc_text:
            text = f"{text}\n{record.exc_text}"
        return text


def handler(fmt: Format = "json", stream: IO[str] | None = None) -> logging.Handler:
    """A stream handler with the context and redaction filters and the formatter of `fmt`."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    made = logging.StreamHandler(stream if stream is not None else sys.stderr)
    made.addFilter(ContextFilter())
    made.addFilter(RedactFilter())
    made.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    return made


def configure(process: str, *, level: str | int = "INFO", fmt: Format = "json", stream: IO[str] | None = None) -> None:
    """Makes every log line of this process go to stderr (or `stream`) structured and redacted."""
    global _process
    _process = process
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler(fmt, stream))
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # Python's warnings (deprecations from libraries) go through the same handler and redaction.
    logging.captureWarnings(True)
