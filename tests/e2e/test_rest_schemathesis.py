"""schemathesis against the gateway's served OpenAPI document: no 5xx, statuses and bodies as documented."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.e2e.test_rest import serve_gateway
from tests.support.stack import Stack

# Examples per operation: bounded so the whole run stays near a minute on a loaded machine.
EXAMPLES = 25


def _check_every_operation(url: str) -> list[str]:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    failures: list[str] = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        operation = result.ok()
        if operation.path.endswith("/events"):
            # A stream of an existing deployment never ends by itself; its 404 and 422 are tested in test_rest.
            continue

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: Any) -> None:
            # The reference's schema states types, not the rules (a known region, a DNS-1123 name, ...): a
            # schema-valid body the API refuses is a 422 by design, so that one check does not apply.
            case.call_and_validate(base_url=url, timeout=30, excluded_checks=[positive_data_acceptance])

        try:
            check()
        except Exception as failure:  # every operation is checked; all failures are reported
            failures.append(f"{operation.label}: {failure}")
    return failures


async def test_the_openapi_document_holds_for_generated_requests(stack: Stack) -> None:
    await stack.add_api()
    stack.add_scheduler()
    stack.add_provisioner()
    gateway = await serve_gateway(stack.apis[0].port)
    try:
        async with httpx.AsyncClient(base_url=gateway.url) as http:
            document = (await http.get("/openapi.json")).json()
        assert "/deployments/app-hosting" in document["paths"]
        # schemathesis is synchronous: it runs in a thread while this loop serves the gateway and the API.
        failures = await asyncio.to_thread(_check_every_operation, gateway.url)
        assert not failures, "\n\n".join(failures)
    finally:
        await gateway.stop()
