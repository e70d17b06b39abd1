"""One create is one trace across the API, scheduler and provisioner processes, and their logs hold no token."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from apphosting.nats_server import NatsServer, free_port, wait_for_port
from apphosting.v1 import deployments_pb2 as pb
from apphosting.v1 import deployments_pb2_grpc
from provisioner.reconcile import CREATE_STEPS
from services.deployments.auth import mint_token

if TYPE_CHECKING:
    from apphosting.v1.deployments_pb2_grpc import DeploymentServiceAsyncStub

# Lines logged by these packages' loggers (not libraries' threads) carry the context.
OUR_PACKAGES = ("apphosting", "services", "scheduler", "provisioner", "apphosting_cli")
SECRET = b"a-secret-of-more-than-32-bytes-for-the-tracing-test"


@dataclass(frozen=True)
class Span:
    process: str
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: int
    attributes: dict[str, Any]


@dataclass
class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace collector on loopback that keeps every span it is sent."""

    spans: list[Span] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def Export(  # noqa: N802 (the OTLP service's method name)
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            resource = {item.key: _value(item.value) for item in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        Span(
                            process=str(resource.get("service.name")),
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex(),
                            name=span.name,
                            kind=span.kind,
                            attributes={item.key: _value(item.value) for item in span.attributes},
                        )
                    )
        self.arrived.set()
        return trace_service_pb2.ExportTraceServiceResponse()

    async def until(self, done: Any) -> list[Span]:
        """Waits until `done(spans)` holds for the spans received so far (bounded by the caller)."""
        while not done(self.spans):
            self.arrived.clear()
            await self.arrived.wait()
        return list(self.spans)


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, int]]:
    server = grpc.aio.server()
    collector = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield collector, port
    await server.stop(None)


@dataclass
class Processes:
    folder: Path
    running: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    stderr: dict[str, str] = field(default_factory=dict)

    def start(self, name: str, args: list[str], env: dict[str, str]) -> None:
        # To a file, not a pipe: nobody reads a pipe while the test runs, and a full one blocks the process.
        with (self.folder / f"{name}.stderr").open("w") as err:
            self.running[name] = subprocess.Popen(
                [sys.executable, "-m", "apphosting_cli", name, *args, "--log-level", "DEBUG"],
                stdout=subprocess.DEVNULL,
                stderr=err,
                text=True,
                env=env,
            )

    def stop(self) -> None:
        """SIGTERM to each, then its whole stderr; a graceful stop also flushes its last spans."""
        for process in self.running.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for name, process in self.running.items():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            self.stderr[name] = (self.folder / f"{name}.stderr").read_text()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    yield started
    started.stop()


def _create(name: str) -> pb.CreateAppHostingDeploymentRequest:
    body = {
        "geographic_region": "eu",
        "deployment_name": name,
        "app_type": "web_app",
        "docker_image": "ghcr.io/acme/web:1.0.0",
        "cpu_request": 0.5,
        "memory_request_mb": 512,
    }
    return json_format.ParseDict(body, pb.CreateAppHostingDeploymentRequest())


async def _wait_running(stub: DeploymentServiceAsyncStub, deployment_id: str, metadata: Any) -> None:
    stream = stub.WatchDeployment(pb.WatchDeploymentRequest(id=deployment_id), metadata=metadata)
    try:
        async with asyncio.timeout(120):
            async for item in stream:
                status = item.deployment.status
                if status == pb.DEPLOYMENT_STATUS_RUNNING:
                    return
                assert status not in (pb.DEPLOYMENT_STATUS_FAILED, pb.DEPLOYMENT_STATUS_ERROR), item
    finally:
        stream.cancel()


async def test_one_create_is_one_trace_through_three_processes_and_no_token_is_logged(
    tmp_path: Path, nats_server: NatsServer, receiver: tuple[Receiver, int], processes: Processes
) -> None:
    collector, otlp_port = receiver
    secret_file = tmp_path / "jwt.secret"
    secret_file.write_bytes(SECRET)
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        # Send spans every 100 ms instead of every 5 s.
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    env.pop("OTEL_SERVICE_NAME", None)
    env.pop("OTEL_TRACES_EXPORTER", None)
    env.pop("OTEL_SDK_DISABLED", None)
    api_port = free_port()
    processes.start(
        "api",
        [
            "--listen",
            f"127.0.0.1:{api_port}",
            "--database-url",
            f"sqlite:///{tmp_path / 'api.db'}",
            "--nats-url",
            nats_server.url,
            "--jwt-secret-file",
            str(secret_file),
        ],
        env,
    )
    processes.start(
        "scheduler", ["--database-url", f"sqlite:///{tmp_path / 'scheduler.db'}", "--nats-url", nats_server.url], env
    )
    # Every step's span must have the API's apply of its own event as a child: no step shares an event.
    processes.start(
        "provisioner", ["--nats-url", nats_server.url, "--simulate-delay", "0.01", "--report-window", "0"], env
    )
    await asyncio.to_thread(wait_for_port, api_port, 60)

    token = mint_token(SECRET, "6a0f5a53-5a4e-4b0c-9d8e-0c9b5f2f1e11")
    # A token the API refuses (signed with another key) is logged as a refusal: without the token.
    refused_token = mint_token(b"another-key-of-more-than-32-bytes-long!", "6a0f5a53-5a4e-4b0c-9d8e-0c9b5f2f1e11")
    metadata = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{api_port}") as channel:
        stub: DeploymentServiceAsyncStub = deployments_pb2_grpc.DeploymentServiceStub(channel)
        created = await stub.CreateAppHostingDeployment(
            _create("traced"), metadata=metadata, timeout=60, wait_for_ready=True
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.GetDeployment(
                pb.GetDeploymentRequest(id=created.id), metadata=(("authorization", f"Bearer {refused_token}"),)
            )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await _wait_running(stub, created.id, metadata)

    def create_trace(spans: list[Span]) -> list[Span]:
        roots = [s for s in spans if s.name.endswith("/CreateAppHostingDeployment")]
        return [s for s in spans if roots and s.trace_id == roots[0].trace_id]

    def complete(spans: list[Span]) -> bool:
        # The API applied the endpoint step's event: the last span of the create to end.
        trace = create_trace(spans)
        steps = {s.span_id for s in trace if s.attributes.get("apphosting.step") == "endpoint"}
        return any(s.process == "apphosting-api" and s.parent_id in steps for s in trace)

    async with asyncio.timeout(120):
        spans = await collector.until(complete)
    trace = create_trace(spans)
    by_id = {s.span_id: s for s in trace}

    # One root, the API's server span; every other span's parent is in the same trace.
    roots = [s for s in trace if not s.parent_id]
    assert [(s.process, s.kind) for s in roots] == [("apphosting-api", trace_pb2.Span.SPAN_KIND_SERVER)]
    root = roots[0]
    assert root.attributes["apphosting.deployment_id"] == created.id
    assert all(s.parent_id in by_id for s in trace if s is not root), trace
    assert {"apphosting-api", "apphosting-scheduler", "apphosting-provisioner"} <= {s.process for s in trace}

    # API (RPC, via the outbox) → scheduler → provisioner → its steps → the API applying each step's event.
    placing = [s for s in trace if s.process == "apphosting-scheduler" and s.parent_id == root.span_id]
    assert placing, trace
    assert all(s.kind == trace_pb2.Span.SPAN_KIND_CONSUMER for s in placing), trace
    jobs = [s for s in trace if s.process == "apphosting-provisioner" and s.kind == trace_pb2.Span.SPAN_KIND_CONSUMER]
    assert jobs, trace
    assert all(by_id[s.parent_id].process == "apphosting-scheduler" for s in jobs), trace
    steps = {str(s.attributes["apphosting.step"]): s for s in trace if "apphosting.step" in s.attributes}
    assert set(CREATE_STEPS) <= set(steps), sorted(steps)
    for step in CREATE_STEPS:
        assert steps[step].process == "apphosting-provisioner"
        assert steps[step].parent_id in {s.span_id for s in jobs}
        assert steps[step].attributes["apphosting.deployment_id"] == created.id
        applied = [s for s in trace if s.process == "apphosting-api" and s.parent_id == steps[step].span_id]
        assert applied, step
        assert applied[0].attributes["apphosting.deployment_id"] == created.id, step

    # Nothing the scheduler or provisioner did for this deployment went into another trace.
    about = [s for s in spans if s.attributes.get("apphosting.deployment_id") == created.id]
    assert {s.trace_id for s in about if s.process != "apphosting-api"} == {root.trace_id}

    processes.stop()
    for name, err in processes.stderr.items():
        assert token not in err, name
        assert refused_token not in err, name
        # Nor its claims or signature alone (the header is the same in every HS256 token).
        for part in token.split(".")[1:]:
            assert part not in err, name
        lines = [json.loads(line) for line in err.splitlines() if line.strip()]
        assert lines, name
        assert all({"time", "level", "process", "logger", "message"} <= set(line) for line in lines), name
        assert {line["process"] for line in lines} == {name}
        # Every line that names the deployment says so in its fields, with the trace it is part of.
        ours = [line for line in lines if line["logger"].split(".")[0] in OUR_PACKAGES]
        about_it = [line for line in ours if created.id in line["message"]]
        for line in about_it:
            assert line.get("deployment_id") == created.id, line
            assert line.get("trace_id"), line
        # Each process logged its part of the create with the deployment, request and trace ids.
        in_trace = [line for line in ours if line.get("trace_id") == root.trace_id]
        assert in_trace, name
        assert all(line.get("deployment_id") == created.id and line.get("request_id") for line in in_trace), name
