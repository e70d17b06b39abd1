"""A small async face over the official kubernetes client: typed calls run in threads, errors classified."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, TypeVar

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from provisioner.driver import PermanentError, TemporaryError

Obj = dict[str, Any]
T = TypeVar("T")

# Connect and read timeouts of every call, so a dead API server fails a step instead of hanging it.
REQUEST_TIMEOUT = (5.0, 30.0)
# Statuses that say "try again": throttled, or the server (or a proxy before it) failed this time.
_TEMPORARY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def api_message(exc: ApiException) -> str:
    """The message of the API's Status object, which says why it refused; else the HTTP reason."""
    try:
        body = json.loads(exc.body or "")
    except (TypeError, ValueError):
        body = None
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return f"{exc.status} {exc.reason}".strip()


def classify(exc: BaseException, what: str) -> Exception:
    """The driver error for a failed call: temporary when a retry may help, permanent for a refusal."""
    if isinstance(exc, ApiException):
        message = f"{what}: {api_message(exc)}"
        # 0: no answer at all (the client's own failure before a response).
        if exc.status in _TEMPORARY_STATUSES or not exc.status:
            return TemporaryError(f"{message} (HTTP {exc.status})")
        if exc.status == 409:
            # A resourceVersion conflict: someone changed the object meanwhile; re-read and retry.
            return TemporaryError(message)
        return PermanentError(message)
    if isinstance(exc, urllib3.exceptions.HTTPError | OSError):
        return TemporaryError(f"{what}: API server unreachable ({exc})")
    return TemporaryError(f"{what}: {exc}")


class KubeApi:
    """The host cluster's API through the official client's typed APIs, called from asyncio."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    @classmethod
    def from_kubeconfig(cls, path: str, context: str | None = None) -> KubeApi:
        configuration = client.Configuration()
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=path, context=context, client_configuration=configuration
        )
        # Retries are the reconciler's job (with backoff and a limit); urllib3's own would hide failures.
        configuration.retries = False
        return cls(client.ApiClient(configuration))

    def close(self) -> None:
        self.api_client.close()  # type: ignore[no-untyped-call]

    def to_dict(self, model: Any) -> Obj:
        """A typed model as the API's JSON (camelCase keys), so every object reads the same way."""
        data = self.api_client.sanitize_for_serialization(model)  # type: ignore[no-untyped-call]
        assert isinstance(data, dict)
        return data

    async def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Runs one blocking client call in a thread; raises PermanentError or TemporaryError."""
        kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT)
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise classify(exc, what) from exc

    async def get(self, what: str, fn: Callable[..., Any], *args: Any) -> Obj | None:
        """Reads an object as a dict; None when it does not exist."""
        try:
            result = await asyncio.to_thread(fn, *args, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise classify(exc, what) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise classify(exc, what) from exc
        return result if isinstance(result, dict) else self.to_dict(result)

    async def create(self, what: str, fn: Callable[..., Any], *args: Any) -> bool:
        """Creates an object; False when it already existed (409 AlreadyExists)."""
        try:
            await asyncio.to_thread(fn, *args, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status == 409 and _reason(exc) == "AlreadyExists":
                return False
            raise classify(exc, what) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise classify(exc, what) from exc
        return True

    async def delete(self, what: str, fn: Callable[..., Any], *args: Any) -> bool:
        """Asks for deletion (in the background: dependents go too); False when it was already gone."""
        body = client.V1DeleteOptions(propagation_policy="Background")
        try:
            await asyncio.to_thread(fn, *args, body=body, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise classify(exc, what) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise classify(exc, what) from exc
        return True


def _reason(exc: ApiException) -> str:
    try:
        body = json.loads(exc.body or "")
    except (TypeError, ValueError):
        return ""
    return str(body.get("reason", "")) if isinstance(body, dict) else ""
