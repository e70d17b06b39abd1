"""Every process serves Prometheus metrics that promtool accepts, with the key series after a create runs."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from apphosting.settings import DEFAULT_REPORT_WINDOW
from apphosting.v1 import deployments_pb2 as pb
from apphosting_cli.rest import RestGateway, RestOptions
from apphosting_client import ClientConfig
from provisioner import CREATE_STEPS
from provisioner.worker import Provisioner, ProvisionerOptions
from scheduler.service import Scheduler, SchedulerOptions
from services.deployments.quotas import Quotas
from tests.integration.test_api import create_request
from tests.support.stack import FAST, Stack, eventually

if TYPE_CHECKING:
    from apphosting.metrics import MetricsServer

PROMTOOL = shutil.which("promtool")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(server: MetricsServer | None) -> str:
    assert server is not None
    async with httpx.AsyncClient() as client:
        response = await client.get(server.url, timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def samples(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in found.items() if n == name and wanted <= ls)


def check_metrics(text: str) -> None:
    if PROMTOOL is None:
        return
    checked = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr


async def test_every_process_serves_its_metrics(stack: Stack) -> None:
    stub = await stack.add_api(metrics_listen="127.0.0.1:0", quotas=Quotas(deployments=1))
    api = stack.apis[0]
    scheduler = Scheduler(
        SchedulerOptions(
            nats_url=stack.nats.url,
            database_url=stack.database_url,
            locations_file=stack.locations_file,
            metrics_listen="127.0.0.1:0",
        )
    )
    stack.schedulers.append(scheduler)
    stack.tasks.append(asyncio.create_task(scheduler.run()))
    provisioner = Provisioner(
        ProvisionerOptions(
            nats_url=stack.nats.url,
            locations_file=stack.locations_file,
            worker_id="metrics",
            simulate_delay=0.0,
            policy=FAST,
            # At zero delay every step is done within the window, so they all share the last event;
            # each step's duration is counted once all the same, the quiet ones' too.
            report_window=30.0,
            metrics_listen="127.0.0.1:0",
        )
    )
    stack.provisioners.append(provisioner)
    stack.tasks.append(asyncio.create_task(provisioner.run()))
    rest = RestGateway(
        RestOptions(
            listen="127.0.0.1:0", client=ClientConfig(address=f"127.0.0.1:{api.port}"), metrics_listen="127.0.0.1:0"
        )
    )
    await rest.start()
    try:
        created = await stub.CreateAppHostingDeployment(create_request())

        async def running() -> bool:
            got = await stub.GetDeployment(pb.GetDeploymentRequest(id=created.id))
            return got.status == pb.DEPLOYMENT_STATUS_RUNNING

        await eventually(running, within=60)
        # Over the user's quota of one deployment: refused, and counted.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CreateAppHostingDeployment(create_request(deployment_name="second"))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        async with httpx.AsyncClient(base_url=rest.url) as http:
            assert (await http.get(f"/deployments/{created.id}")).status_code == 200
            assert (await http.get("/no/such/route")).status_code == 404

        # Gauges are refreshed in the background: wait for the ones that show the running deployment.
        async def api_caught_up() -> bool:
            found = samples(await scrape(api.metrics_server))
            return (
                value(found, "apphosting_deployments", status="running", geographic_region="eu") == 1
                and value(found, "apphosting_deployment_create_to_running_seconds_count") == 1
            )

        await eventually(api_caught_up, within=60)

        async def scheduler_caught_up() -> bool:
            found = samples(await scrape(scheduler.metrics_server))
            return value(found, "apphosting_scheduler_capacity_used", resource="vclusters") == 1

        await eventually(scheduler_caught_up, within=60)

        async def provisioner_caught_up() -> bool:
            found = samples(await scrape(provisioner.metrics_server))
            return any(n == "apphosting_consumer_pending_messages" for n, _ in found)

        await eventually(provisioner_caught_up, within=60)

        api_text = await scrape(api.metrics_server)
        found = samples(api_text)
        service = "apphosting.v1.DeploymentService"
        create = {"grpc_service": service, "grpc_method": "CreateAppHostingDeployment"}
        assert value(found, "grpc_server_started_total", grpc_type="unary", **create) == 2
        assert value(found, "grpc_server_handled_total", grpc_code="OK", **create) == 1
        assert value(found, "grpc_server_handled_total", grpc_code="RESOURCE_EXHAUSTED", **create) == 1
        assert value(found, "grpc_server_handling_seconds_count", **create) == 2
        assert value(found, "apphosting_quota_refusals_total", grpc_method="CreateAppHostingDeployment") == 1
        assert value(found, "apphosting_deployment_create_to_placed_seconds_count") == 1
        assert value(found, "apphosting_deployment_placed_to_vcluster_ready_seconds_count") == 1
        assert value(found, "apphosting_outbox_backlog") == 0
        assert value(found, "apphosting_outbox_oldest_age_seconds") == 0
        assert value(found, "apphosting_watch_streams_open") == 0
        assert (
            "apphosting_consumer_pending_messages",
            frozenset({("stream", "APPHOSTING_EVENTS"), ("consumer", "api-events")}),
        ) in found
        # No deployment id appears in any label: label values stay bounded.
        assert created.id not in api_text
        check_metrics(api_text)

        scheduler_text = await scrape(scheduler.metrics_server)
        found = samples(scheduler_text)
        assert value(found, "apphosting_scheduler_placements_total", outcome="placed") == 1
        for resource in ("cpu", "memory_mb", "storage_gb", "vclusters"):
            total = value(found, "apphosting_scheduler_capacity", resource=resource)
            used = value(found, "apphosting_scheduler_capacity_used", resource=resource)
            free = value(found, "apphosting_scheduler_capacity_free", resource=resource)
            assert total > 0
            assert used + free == pytest.approx(total)
        assert created.id not in scheduler_text
        check_metrics(scheduler_text)

        provisioner_text = await scrape(provisioner.metrics_server)
        found = samples(provisioner_text)
        # kubeconfig is the create's quiet step: it never reports an event of its own.
        for step in (*CREATE_STEPS, "kubeconfig"):
            assert (
                value(
                    found,
                    "apphosting_reconcile_step_duration_seconds_count",
                    step=step,
                    driver="simulated",
                    outcome="done",
                )
                == 1
            ), step
        assert value(found, "apphosting_provisioner_jobs_total", operation="create", result="finished") == 1
        assert value(found, "apphosting_provisioner_jobs_running") == 0
        assert created.id not in provisioner_text
        check_metrics(provisioner_text)

        rest_text = await scrape(rest.metrics_server)
        found = samples(rest_text)
        assert (
            value(found, "http_server_requests_total", method="GET", route="/deployments/{deployment_id}", code="200")
            == 1
        )
        assert value(found, "http_server_requests_total", method="GET", route="other", code="404") == 1
        assert value(found, "http_server_request_duration_seconds_count", route="/deployments/{deployment_id}") == 1
        assert created.id not in rest_text
        check_metrics(rest_text)
    finally:
        await rest.stop()


@pytest.mark.parametrize("report_window", [0.0, DEFAULT_REPORT_WINDOW])
async def test_placed_to_vcluster_ready_is_observed_once_per_deployment(stack: Stack, report_window: float) -> None:
    # At window 0 vcluster_ready reports on its own event; within the default window its condition
    # rides on a later step's. A start reports the vCluster ready again: not a second observation.
    stub = await stack.add_api(metrics_listen="127.0.0.1:0")
    api = stack.apis[0]
    stack.add_scheduler()
    stack.add_provisioner(report_window=report_window)
    created = await stub.CreateAppHostingDeployment(create_request())

    def settled_in(status: pb.DeploymentStatus.ValueType) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            got = await stub.GetDeployment(pb.GetDeploymentRequest(id=created.id))
            return got.status == status

        return check

    async def observed(name: str, count: int) -> bool:
        return value(samples(await scrape(api.metrics_server)), name) == count

    await eventually(settled_in(pb.DEPLOYMENT_STATUS_RUNNING), within=60)
    await eventually(lambda: observed("apphosting_deployment_placed_to_vcluster_ready_seconds_count", 1), within=60)

    await stub.StopDeployment(pb.StopDeploymentRequest(id=created.id))
    await eventually(settled_in(pb.DEPLOYMENT_STATUS_STOPPED), within=60)
    await stub.StartDeployment(pb.StartDeploymentRequest(id=created.id))
    await eventually(settled_in(pb.DEPLOYMENT_STATUS_RUNNING), within=60)
    # The teardown's events come after the start's: once its end is observed, so is the start.
    await stub.DeleteDeployment(pb.DeleteDeploymentRequest(id=created.id))
    await eventually(lambda: observed("apphosting_deployment_delete_to_gone_seconds_count", 1), within=60)

    api_text = await scrape(api.metrics_server)
    assert value(samples(api_text), "apphosting_deployment_placed_to_vcluster_ready_seconds_count") == 1
    check_metrics(api_text)


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian package prometheus)")
def test_promtool_is_here() -> None:
    """Marks, in the report, whether the metrics above were checked by promtool."""
    assert PROMTOOL is not None
