"""Structured log lines: the fields every line has, the context of lines about a deployment, and no secrets."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, use_span

from apphosting import logs
from services.deployments.auth import mint_token

SECRET = b"a-secret-of-more-than-32-bytes-for-the-logs-test"
DEPLOYMENT = "3f1c2a9e-8b7d-4c6e-9a5f-1d2e3c4b5a69"


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    logger = logging.getLogger("tests.unit.test_logs")
    handler = logs.handler("json", stream)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict[str, str]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_every_line_has_level_time_process_logger_and_message(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    logger.warning("capacity is %d%% used", 93)
    [line] = lines(stream)
    assert line["level"] == "WARNING"
    assert line["logger"] == "tests.unit.test_logs"
    assert line["message"] == "capacity is 93% used"
    assert line["process"] == logs.process_name()
    assert line["time"].endswith("Z")
    assert "deployment_id" not in line
    assert "trace_id" not in line


def test_a_line_about_a_deployment_names_it_its_request_and_its_trace(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured
    context = SpanContext(
        trace_id=0x4BF92F3577B34DA6A3CE929D0E0E4736,
        span_id=0x00F067AA0BA902B7,
        is_remote=False,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    with logs.bound(deployment_id=DEPLOYMENT, request_id="req-1"), use_span(NonRecordingSpan(context)):
        logger.info("placed")
    logger.info("after")
    about, after = lines(stream)
    assert about["deployment_id"] == DEPLOYMENT
    assert about["request_id"] == "req-1"
    assert about["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert about["span_id"] == "00f067aa0ba902b7"
    # The context ends with the block.
    assert "deployment_id" not in after
    assert "trace_id" not in after


def test_bound_contexts_nest_and_restore() -> None:
    with logs.bound(deployment_id="a", request_id="r"):
        with logs.bound(deployment_id="b"):
            assert (logs.deployment_id(), logs.request_id()) == ("b", "r")
        assert logs.deployment_id() == "a"
    assert logs.deployment_id() is None
    assert logs.request_id() is None


TOKEN = mint_token(SECRET, "6a0f5a53-5a4e-4b0c-9d8e-0c9b5f2f1e11")


@pytest.mark.parametrize(
    ("template", "args", "secret"),
    [
        ("metadata: %s", ([("authorization", f"Bearer {TOKEN}")],), TOKEN),
        ("Authorization: Bearer %s", (TOKEN,), TOKEN),
        ("token %s refused", (TOKEN,), TOKEN),
        ("connect nats://app:%s@nats:4222", ("hunter2hunter2",), "hunter2hunter2"),
        ("config %s", ({"password": "s3cr3t-value"},), "s3cr3t-value"),
        ("values: api_key=%s other=1", ("AKIAEXAMPLEKEY123",), "AKIAEXAMPLEKEY123"),
        ("kubeconfig token: %s", ("k8s-sa-token-abcdef123456",), "k8s-sa-token-abcdef123456"),
        (
            "seed %s",
            ("SUAMK2FG4MI6UE3ACF3FK3OIQBCEIEZV7NSWFFEW63UXMRLFM2XLAXK4GY",),
            "SUAMK2FG4MI6UE3ACF3FK3OIQBCEIEZV7NSW",
        ),
        ("key\n%s", ("-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg\n-----END PRIVATE KEY-----",), "MIIEvQIBADANBg"),
    ],
)
def test_no_token_or_secret_reaches_a_line(
    captured: tuple[logging.Logger, io.StringIO], template: str, args: tuple[object, ...], secret: str
) -> None:
    logger, stream = captured
    logger.info(template, *args)
    text = stream.getvalue()
    assert secret not in text
    assert "[REDACTED]" in text
    # Not even one part of a JWT: claims and signature are each enough to matter.
    for part in TOKEN.split(".")[1:]:
        assert part not in text


def test_a_secret_in_a_traceback_is_redacted(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    try:
        raise ValueError(f"upstream answered 401 to Bearer {TOKEN}")
    except ValueError:
        logger.exception("call failed")
    [line] = lines(stream)
    assert TOKEN not in stream.getvalue()
    assert "ValueError" in line["exception"]


def test_words_that_only_name_secrets_are_kept(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    logger.info("refused: the bearer token is not valid")
    assert lines(stream)[0]["message"] == "refused: the bearer token is not valid"


def test_console_format_is_one_readable_line_with_the_context() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("tests.unit.test_logs.console")
    logger.addHandler(logs.handler("console", stream))
    logger.propagate = False
    with logs.bound(deployment_id=DEPLOYMENT, request_id="req-2"):
        logger.warning("step %s retried", "vcluster")
    text = stream.getvalue()
    assert text.count("\n") == 1
    assert "WARNING" in text
    assert "step vcluster retried" in text
    assert f"deployment={DEPLOYMENT}" in text
    assert "request=req-2" in text


def test_configure_makes_the_root_handler_structured(monkeypatch: pytest.MonkeyPatch) -> None:
    # configure() names the process for the rest of its life; this test's process is pytest.
    monkeypatch.setattr(logs, "_process", logs.process_name())
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    try:
        logs.configure("scheduler", level="info", stream=stream)
        logging.getLogger("scheduler.service").info("placed on %s", "eu-1")
        logging.getLogger("scheduler.service").debug("not shown")
        [line] = lines(stream)
        assert line["process"] == "scheduler"
        assert line["message"] == "placed on eu-1"
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.captureWarnings(False)
