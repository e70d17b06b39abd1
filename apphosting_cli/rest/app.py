"""The REST gateway's routes: each one call of the gRPC DeploymentService, its answer in the reference's JSON."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Annotated, Any, TypeVar

import grpc
from fastapi import Body, FastAPI, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from apphosting import metrics
from apphosting.v1 import api_keys_pb2
from apphosting.v1 import deployments_pb2 as pb
from apphosting_cli.rest import convert, models
from apphosting_client import AsyncClient, ClientConfig, read_error

log = logging.getLogger(__name__)

T = TypeVar("T")
Loc = list[str | int]
Locate = Callable[[str], Loc]

# The caller's Authorization header, forwarded as the gRPC call's metadata: the API verifies it.
_CALLER: ContextVar[str | None] = ContextVar("apphosting_rest_caller", default=None)

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 422,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 410,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
}
_ERROR = {"model": models.ErrorBody}
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {**_ERROR, "description": "No valid bearer token"},
    403: {**_ERROR, "description": "Not allowed"},
    404: {**_ERROR, "description": "No such deployment of the caller"},
    409: {**_ERROR, "description": "Conflict: the name is taken, the status does not allow it, or If-Match is stale"},
    410: {**_ERROR, "description": "The revision to resume from is older than the kept history"},
    429: {**_ERROR, "description": "A quota or rate limit is reached"},
    500: {**_ERROR, "description": "Internal error; the detail carries a correlation id"},
    503: {**_ERROR, "description": "The API or its backend is unavailable; retry"},
    504: {**_ERROR, "description": "The API did not answer in time"},
}
# The bound of GET /deployments and /releases: they walk the API's pages, at most 1000 a page.
MAX_SKIP = 10_000
MAX_LIMIT = 1_000
_SEGMENT = re.compile(r"\[(\d+)\]|([^.\[\]]+)")


def _caller_credentials() -> Sequence[tuple[str, str]]:
    """The Authorization of the request being served, passed on to the API, which verifies it."""
    caller = _CALLER.get()
    return (("authorization", caller),) if caller else ()


class _Refused(Exception):
    def __init__(self, error: grpc.aio.AioRpcError, locate: Locate) -> None:
        super().__init__(error.details())
        self.error = error
        self.locate = locate


class _Unauthenticated(Exception):
    pass


def field_loc(field: str) -> Loc:
    """A gRPC field path (`volumes[0].path`) as its parts: ["volumes", 0, "path"]."""
    return [int(index) if index else name for index, name in _SEGMENT.findall(field)]


def _in_body(field: str) -> Loc:
    parts = field_loc(field)
    if parts[:1] == ["id"]:
        return ["path", "deployment_id"]
    if parts[:1] == ["etag"]:
        return ["header", "If-Match"]
    if parts[:1] in (["validate_only"], ["force"], ["reason"]):
        return ["query", *parts]
    return ["body", *parts]


def _error_body(error: grpc.aio.AioRpcError, locate: Locate) -> tuple[int, Any]:
    refused = read_error(error)
    message = refused.message
    code = HTTP_STATUS.get(error.code(), 500)
    if code == 422:
        entries = [{"loc": locate(v.field), "msg": v.description, "type": v.reason} for v in refused.violations] or [
            {"loc": ["body"], "msg": message, "type": refused.reason or "INVALID_ARGUMENT"}
        ]
        return code, {"detail": entries}
    if error.code() not in HTTP_STATUS:
        # An answer the API never gives on purpose (a dropped connection, a cancelled call) says no more.
        log.warning("gRPC call failed: %s %s", error.code(), message)
        return code, {"detail": "the API call failed", "reason": error.code().name}
    return code, {"detail": message, "reason": refused.reason or error.code().name}


async def _rpc(call: Awaitable[T], locate: Locate = _in_body) -> T:
    try:
        return await call
    except grpc.aio.AioRpcError as error:
        raise _Refused(error, locate) from None


def _unsendable(error: convert.Unsendable) -> JSONResponse:
    return JSONResponse(
        {
            "detail": [
                {
                    "loc": loc,
                    "msg": "the value does not fit the field's type (integer range, text)",
                    "type": "INVALID_VALUE",
                }
                for loc in error.locations
            ]
        },
        status_code=422,
    )


def _etag(if_match: str | None) -> str:
    if not if_match:
        return ""
    return if_match.strip().removeprefix("W/").strip('"')


def _answer(response: Response, deployment: pb.Deployment) -> models.DeploymentResponse:
    if deployment.etag:
        response.headers["ETag"] = f'"{deployment.etag}"'
    return convert.deployment(deployment)


class _HttpMetrics:
    """HTTP server metrics by method, route template (never the path: it holds ids) and status code."""

    _METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

    def __init__(self, app: ASGIApp, registry: CollectorRegistry) -> None:
        self.app = app
        self.requests = Counter(
            "http_server_requests_total",
            "HTTP requests the REST gateway answered, by method, route template and status code",
            ("method", "route", "code"),
            registry=registry,
        )
        self.duration = Histogram(
            "http_server_request_duration_seconds",
            "Time the REST gateway took to answer a request (to the end of its body; an event stream's whole life)",
            ("method", "route"),
            buckets=metrics.REQUEST_BUCKETS,
            registry=registry,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        code = 500

        async def sending(message: Message) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            # The router put the matched route in the scope; none matched: one label value for all.
            route = getattr(scope.get("route"), "path", None) or metrics.OTHER
            method = metrics.bounded(scope["method"], self._METHODS)
            self.requests.labels(method, route, str(code)).inc()
            self.duration.labels(method, route).observe(time.perf_counter() - start)


class _ForwardAuthorization:
    """Pure ASGI, so the context variable it sets is the one the route and its stream run in."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        caller = None
        for key, value in scope["headers"]:
            if key == b"authorization":
                caller = value
        if caller is not None and not (caller.isascii() and caller.strip()):
            # gRPC metadata is printable ASCII: anything else cannot be a token the API would accept.
            response = JSONResponse(
                {"detail": "the Authorization header is not a bearer token", "reason": "TOKEN_INVALID"},
                status_code=401,
            )
            await response(scope, receive, send)
            return
        token = _CALLER.set(caller.decode("ascii").strip() if caller else None)
        try:
            await self.app(scope, receive, send)
        finally:
            _CALLER.reset(token)


IfMatch = Annotated[str | None, Header(description="The deployment's etag; a stale one is refused with 409.")]
ValidateOnly = Annotated[bool, Query(description="Check the change, write nothing.")]
Reason = Annotated[str, Query(max_length=1024, description="Why; kept with the release.")]
DeploymentId = Annotated[str, Path(description="The deployment's UUID.")]
Skip = Annotated[int, Query(ge=0, le=MAX_SKIP)]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT)]


def create_app(config: ClientConfig, registry: CollectorRegistry | None = None) -> FastAPI:
    """The gateway for the API at `config.address`; one client (one channel) for the app's lifetime.

    With a registry, every request is counted and timed in it.
    """
    state: dict[str, AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state["client"] = AsyncClient(config, credentials=_caller_credentials)
        try:
            yield
        finally:
            await state.pop("client").close()

    def client() -> AsyncClient:
        return state["client"]

    app = FastAPI(
        title="App Hosting",
        version="1",
        description="The REST endpoint of the App Hosting control plane: a gateway over its gRPC "
        "DeploymentService. Send `Authorization: Bearer <token>` when the API requires it.",
        lifespan=lifespan,
        responses=ERRORS,
    )
    app.add_middleware(_ForwardAuthorization)
    if registry is not None:
        # Added last, so it is outermost: it also counts what the authorization check refuses.
        app.add_middleware(_HttpMetrics, registry=registry)

    @app.exception_handler(_Refused)
    async def refused(_: Request, exc: _Refused) -> JSONResponse:
        code, body = _error_body(exc.error, exc.locate)
        # A backend that said when to come back (a rate-limited registry) says it in HTTP's words too.
        wait = read_error(exc.error).metadata.get("retry_after_seconds", "")
        headers = {"Retry-After": wait} if code == 503 and wait.isdigit() else None
        return JSONResponse(body, status_code=code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        entries = [
            {"loc": list(error["loc"]), "msg": str(error["msg"]), "type": str(error["type"])} for error in exc.errors()
        ]
        return JSONResponse({"detail": entries}, status_code=422)

    @app.exception_handler(Exception)
    async def failed(_: Request, exc: Exception) -> JSONResponse:
        log.error("REST gateway failure", exc_info=exc)
        return JSONResponse(
            {"detail": "internal error of the REST gateway", "reason": "INTERNAL_ERROR"}, status_code=500
        )

    @app.post(
        "/deployments/app-hosting",
        status_code=201,
        response_model=models.DeploymentResponse,
        summary="Create App Hosting Deployment",
        responses={200: {"model": models.DeploymentResponse, "description": "validate_only: what would be made"}},
    )
    async def create_deployment(
        body: models.AppHostingDeploymentCreate,
        response: Response,
        validate_only: ValidateOnly = False,
        idempotency_key: Annotated[
            str | None, Header(description="A UUID: a repeated request with the same key returns the first result.")
        ] = None,
    ) -> models.DeploymentResponse:
        """Create a deployment on App Hosting infrastructure: its own vCluster on a shared host cluster of
        the best location in the geographic region, then the app in it. Watch it at /deployments/{id}/events."""
        try:
            request = convert.create_request(body)
        except convert.Unsendable as error:
            raise _RequestUnsendable(error) from None
        request.validate_only = validate_only
        if idempotency_key:
            request.request_id = idempotency_key
        created = await _rpc(client().create(request))
        if validate_only:
            response.status_code = 200
        return _answer(response, created)

    @app.get("/deployments", response_model=list[models.DeploymentResponse], summary="List deployments")
    async def list_deployments(
        skip: Skip = 0, limit: Limit = 100, show_deleted: bool = False
    ) -> list[models.DeploymentResponse]:
        """The caller's deployments, newest first: `skip` then at most `limit` (skip ≤ 10000, limit ≤ 1000).

        Deployments already torn down are left out unless `show_deleted` (they are kept until purged).
        """
        found: list[pb.Deployment] = []
        token = ""
        while len(found) < skip + limit:
            size = min(MAX_LIMIT, skip + limit - len(found))
            page = await _rpc(client().list(page_size=size, page_token=token, show_deleted=show_deleted), _in_query)
            found.extend(page.deployments)
            token = page.next_page_token
            if not token:
                break
        return [convert.deployment(item) for item in found[skip : skip + limit]]

    @app.get("/deployments/{deployment_id}", response_model=models.DeploymentResponse, summary="Get a deployment")
    async def get_deployment(deployment_id: DeploymentId, response: Response) -> models.DeploymentResponse:
        return _answer(response, await _rpc(client().get(deployment_id)))

    @app.delete("/deployments/{deployment_id}", response_model=models.DeploymentResponse, summary="Delete")
    async def delete_deployment(
        deployment_id: DeploymentId,
        response: Response,
        force: Annotated[bool, Query(description="Adopted: delete its workloads too (else released).")] = False,
        if_match: IfMatch = None,
    ) -> models.DeploymentResponse:
        """Starts tearing the deployment down (status deleting); the events stream ends when it is gone."""
        return _answer(response, await _rpc(client().delete(deployment_id, etag=_etag(if_match), force=force)))

    @app.patch("/deployments/{deployment_id}", response_model=models.DeploymentResponse, summary="Update")
    async def update_deployment(
        deployment_id: DeploymentId,
        body: models.DeploymentUpdate,
        response: Response,
        if_match: IfMatch = None,
        validate_only: ValidateOnly = False,
        reason: Reason = "",
    ) -> models.DeploymentResponse:
        """Changes the fields present in the body (the update mask is its keys; null clears a field) as a new
        release, rolled out in place."""
        keys = list(body.model_dump(exclude_unset=True))
        values = {key: value for key, value in body.model_dump(exclude_unset=True).items() if value is not None}
        deployment = pb.Deployment(id=deployment_id)
        try:
            convert.fill(deployment, values, ["body"])
        except convert.Unsendable as error:
            raise _RequestUnsendable(error) from None

        def locate(field: str) -> Loc:
            parts = field_loc(field)
            if parts[:1] == ["deployment"]:
                return _in_body(field.removeprefix("deployment."))
            if parts[:2] == ["update_mask", "paths"] and len(parts) > 2 and isinstance(parts[2], int):
                return ["body", keys[parts[2]]] if parts[2] < len(keys) else ["body"]
            if parts[:1] == ["update_mask"]:
                return ["body"]
            return _in_body(field)

        updated = await _rpc(
            client().update(deployment, keys, etag=_etag(if_match), validate_only=validate_only, reason=reason), locate
        )
        return _answer(response, updated)

    @app.post("/deployments/{deployment_id}/scale", response_model=models.DeploymentResponse, summary="Scale")
    async def scale_deployment(
        deployment_id: DeploymentId,
        body: models.ScaleBody,
        response: Response,
        if_match: IfMatch = None,
        validate_only: ValidateOnly = False,
        reason: Reason = "",
    ) -> models.DeploymentResponse:
        request = pb.ScaleDeploymentRequest(
            id=deployment_id, etag=_etag(if_match), validate_only=validate_only, reason=reason
        )
        try:
            convert.fill(request, {"replicas": body.replicas}, ["body"])
        except convert.Unsendable as error:
            raise _RequestUnsendable(error) from None
        return _answer(
            response,
            await _rpc(
                client().scale(
                    deployment_id, request.replicas, etag=request.etag, reason=reason, validate_only=validate_only
                )
            ),
        )

    @app.post("/deployments/{deployment_id}/stop", response_model=models.DeploymentResponse, summary="Stop")
    async def stop_deployment(
        deployment_id: DeploymentId,
        response: Response,
        if_match: IfMatch = None,
        validate_only: ValidateOnly = False,
        reason: Reason = "",
    ) -> models.DeploymentResponse:
        """Scales the app to zero and puts its vCluster to sleep; volumes and config are kept."""
        stopped = client().stop(deployment_id, etag=_etag(if_match), reason=reason, validate_only=validate_only)
        return _answer(response, await _rpc(stopped))

    @app.post("/deployments/{deployment_id}/start", response_model=models.DeploymentResponse, summary="Start")
    async def start_deployment(
        deployment_id: DeploymentId,
        response: Response,
        if_match: IfMatch = None,
        validate_only: ValidateOnly = False,
        reason: Reason = "",
    ) -> models.DeploymentResponse:
        """Wakes a stopped deployment and scales its app back up."""
        started = client().start(deployment_id, etag=_etag(if_match), reason=reason, validate_only=validate_only)
        return _answer(response, await _rpc(started))

    @app.post("/deployments/{deployment_id}/rollback", response_model=models.DeploymentResponse, summary="Rollback")
    async def rollback_deployment(
        deployment_id: DeploymentId,
        response: Response,
        body: Annotated[models.RollbackBody | None, Body()] = None,
        if_match: IfMatch = None,
        validate_only: ValidateOnly = False,
        reason: Reason = "",
    ) -> models.DeploymentResponse:
        """Applies an earlier release again as a new release and pauses automatic image updates."""
        request = pb.RollbackDeploymentRequest(
            id=deployment_id, etag=_etag(if_match), validate_only=validate_only, reason=reason
        )
        try:
            convert.fill(request, {"release": body.release if body else 0}, ["body"])
        except convert.Unsendable as error:
            raise _RequestUnsendable(error) from None
        return _answer(
            response,
            await _rpc(
                client().rollback(
                    deployment_id, request.release, etag=request.etag, reason=reason, validate_only=validate_only
                )
            ),
        )

    @app.post("/deployments/{deployment_id}/retry", response_model=models.DeploymentResponse, summary="Retry")
    async def retry_deployment(
        deployment_id: DeploymentId, response: Response, if_match: IfMatch = None
    ) -> models.DeploymentResponse:
        """Starts a failed or errored deployment again from placement."""
        return _answer(response, await _rpc(client().retry(deployment_id, etag=_etag(if_match))))

    @app.post(
        "/deployments/{deployment_id}/promote",
        status_code=201,
        response_model=models.PromoteResponse,
        summary="Promote",
        responses={200: {"model": models.PromoteResponse, "description": "validate_only: what would be made"}},
    )
    async def promote_deployment(
        deployment_id: DeploymentId,
        body: models.PromoteBody,
        response: Response,
        if_match: IfMatch = None,
        validate_only: ValidateOnly = False,
    ) -> models.PromoteResponse:
        """Copies the deployment's configuration (with overrides) to a new deployment on the target; with
        delete_source a migration: the source shows migrating and goes once the copy runs."""
        request = pb.PromoteDeploymentRequest(id=deployment_id, etag=_etag(if_match), validate_only=validate_only)
        try:
            convert.fill(request, body.model_dump(exclude_unset=True), ["body"])
        except convert.Unsendable as error:
            raise _RequestUnsendable(error) from None
        promoted = await _rpc(client().promote(request))
        if validate_only:
            response.status_code = 200
        return models.PromoteResponse(
            source=convert.deployment(promoted.source), target=convert.deployment(promoted.target)
        )

    @app.post(
        "/deployments/adopt",
        status_code=201,
        response_model=models.DeploymentResponse,
        summary="Adopt a namespace",
        responses={200: {"model": models.DeploymentResponse, "description": "validate_only: what would be made"}},
    )
    async def adopt_deployment(
        body: models.AdoptBody, response: Response, validate_only: ValidateOnly = False
    ) -> models.DeploymentResponse:
        """Takes an existing namespace with its workloads on a host cluster under management."""
        request = pb.AdoptDeploymentRequest(validate_only=validate_only)
        try:
            convert.fill(request, body.model_dump(exclude_unset=True), ["body"])
        except convert.Unsendable as error:
            raise _RequestUnsendable(error) from None
        adopted = await _rpc(client().adopt(request))
        if validate_only:
            response.status_code = 200
        return _answer(response, adopted)

    @app.get("/deployments/{deployment_id}/releases", response_model=list[models.ReleaseResponse], summary="Releases")
    async def list_releases(
        deployment_id: DeploymentId, skip: Skip = 0, limit: Limit = 100
    ) -> list[models.ReleaseResponse]:
        """The deployment's releases, newest first: `skip` then at most `limit` (skip ≤ 10000, limit ≤ 1000)."""
        found: list[pb.Release] = []
        token = ""
        while len(found) < skip + limit:
            page = await _rpc(
                client().releases(deployment_id, page_size=min(MAX_LIMIT, skip + limit - len(found)), page_token=token)
            )
            found.extend(page.releases)
            token = page.next_page_token
            if not token:
                break
        return [convert.release(item) for item in found[skip : skip + limit]]

    @app.post("/api-keys", status_code=201, response_model=models.ApiKeyCreated, summary="Create an API key")
    async def create_api_key(body: models.ApiKeyCreate) -> models.ApiKeyCreated:
        """A key for automation, sent as `Authorization: Bearer <key>`. The answer's `key` is its only showing:
        only a hash is kept. Only a token (not another API key) may create one."""
        if not body.name.isascii():
            try:
                body.name.encode("utf-8")
            except UnicodeEncodeError:
                # JSON allows a lone surrogate; a protobuf string cannot carry one.
                raise _RequestUnsendable(convert.Unsendable([["body", "name"]])) from None
        made = await _rpc(client().create_api_key(body.name, read_only=body.read_only, ttl_seconds=body.ttl_seconds))
        return convert.api_key_created(made)

    @app.get("/api-keys", response_model=list[models.ApiKeyResponse], summary="List API keys")
    async def list_api_keys(skip: Skip = 0, limit: Limit = 100) -> list[models.ApiKeyResponse]:
        """The caller's keys (never their secrets), newest first: `skip` then at most `limit`."""
        found: list[api_keys_pb2.ApiKey] = []
        token = ""
        while len(found) < skip + limit:
            page = await _rpc(
                client().list_api_keys(page_size=min(MAX_LIMIT, skip + limit - len(found)), page_token=token),
                _in_query,
            )
            found.extend(page.api_keys)
            token = page.next_page_token
            if not token:
                break
        return [convert.api_key(item) for item in found[skip : skip + limit]]

    @app.delete("/api-keys/{key_id}", response_model=models.ApiKeyResponse, summary="Revoke an API key")
    async def revoke_api_key(key_id: Annotated[str, Path(description="The key's id.")]) -> models.ApiKeyResponse:
        """Revokes one of the caller's keys at once; revoking it again answers it unchanged."""
        return convert.api_key(await _rpc(client().revoke_api_key(key_id), lambda field: ["path", "key_id"]))

    @app.get(
        "/deployments/{deployment_id}/image-update-preview",
        response_model=models.ImageUpdatePreview,
        summary="Preview an image update",
    )
    async def image_update_preview(deployment_id: DeploymentId) -> models.ImageUpdatePreview:
        """Which tag the deployment's image update policy would deploy now, every candidate tag with its verdict,
        and what an update would change; nothing is written. A registry that cannot be asked now answers 503."""
        return convert.image_preview(await _rpc(client().preview_image_update(deployment_id)))

    @app.get(
        "/deployments/{deployment_id}/events",
        summary="Stream a deployment's changes",
        response_class=StreamingResponse,
        responses={
            200: {
                "description": "Server-sent events: `id:` the revision, `data:` a WatchEvent as JSON; the stream "
                "ends after the deployment's final event. An `event: error` carries {detail, reason}.",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            }
        },
    )
    async def deployment_events(
        deployment_id: DeploymentId,
        last_event_id: Annotated[
            str | None, Header(description="Resume: every change after this revision (the last `id:` seen).")
        ] = None,
        since_revision: Annotated[
            int, Query(ge=0, description="As Last-Event-ID, for clients that cannot send it.")
        ] = 0,
    ) -> StreamingResponse:
        """The deployment's current state (unless resuming), then each change as it is applied."""
        since = since_revision
        if last_event_id is not None and last_event_id.strip():
            if not last_event_id.strip().isdigit():
                raise RequestValidationError(
                    [
                        {
                            "loc": ("header", "last-event-id"),
                            "msg": "must be a revision (an integer)",
                            "type": "int_parsing",
                        }
                    ]
                )
            since = int(last_event_id.strip())
        # Asked first so an unknown deployment or a refused caller is an HTTP status, not a broken stream.
        await _rpc(client().get(deployment_id))
        caller = _CALLER.get()
        watcher = client()

        async def stream() -> AsyncIterator[str]:
            _CALLER.set(caller)
            try:
                async for item in watcher.watch(deployment_id, since_revision=since):
                    data = convert.watch_item(item).model_dump_json()
                    yield f"id: {item.deployment.revision}\ndata: {data}\n\n"
            except grpc.aio.AioRpcError as error:
                _, body = _error_body(error, _in_body)
                yield f"event: error\ndata: {json.dumps(body)}\n\n"

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    @app.exception_handler(_RequestUnsendable)
    async def unsendable(_: Request, exc: _RequestUnsendable) -> JSONResponse:
        return _unsendable(exc.error)

    return app


class _RequestUnsendable(Exception):
    def __init__(self, error: convert.Unsendable) -> None:
        super().__init__(str(error))
        self.error = error


def _in_query(field: str) -> Loc:
    parts = field_loc(field)
    renames: dict[str | int, str] = {"page_size": "limit", "page_token": "skip"}
    return ["query", renames.get(parts[0], str(parts[0]))] if parts else ["query"]
