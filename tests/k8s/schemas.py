"""Validators for what the driver renders: the vcluster chart's values schema, Argo CD's Application CRD,
and the official Kubernetes schemas (kubernetes-validate) of every supported version."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from apphosting.settings import KUBERNETES_VERSIONS

SCHEMAS_DIR = Path(__file__).resolve().parents[3] / "shared" / "reference" / "schemas"
VCLUSTER_SCHEMA = SCHEMAS_DIR / "vcluster-values.schema.json"
APPLICATION_CRD = SCHEMAS_DIR / "argocd-application-crd.yaml"
# kubernetes-validate ships the schemas of 1.33 to 1.37 today, so every supported version is checked;
# a version it lacks (a future one) is checked against the newest it has and said so in the message.
_SERVER_FIELDS = ("uid", "resourceVersion", "creationTimestamp", "generation", "deletionTimestamp")


def schemas_missing_reason() -> str | None:
    if not VCLUSTER_SCHEMA.exists() or not APPLICATION_CRD.exists():
        return f"reference schemas are absent (looked in {SCHEMAS_DIR}); see ../shared/reference/schemas/README.md"
    return None


def require_schemas() -> None:
    reason = schemas_missing_reason()
    if reason is not None:
        pytest.skip(reason)


@functools.cache
def _vcluster_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(VCLUSTER_SCHEMA.read_text())
    cls = jsonschema.validators.validator_for(schema)
    validator: jsonschema.protocols.Validator = cls(schema)
    return validator


@functools.cache
def _application_validator() -> jsonschema.protocols.Validator:
    crd = yaml.safe_load(APPLICATION_CRD.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return jsonschema.Draft7Validator(schema)


def _errors(validator: jsonschema.protocols.Validator, document: Any) -> str | None:
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    if not errors:
        return None
    return "; ".join(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors[:5])


def vcluster_values_errors(values: dict[str, Any]) -> str | None:
    return _errors(_vcluster_validator(), values)


def application_errors(application: dict[str, Any]) -> str | None:
    return _errors(_application_validator(), application)


def _supported_schema_versions() -> list[str]:
    shipped = {v.rsplit(".", 1)[0] for v in kubernetes_validate.utils.all_versions()}
    return [
        f"{v}.0" if v in shipped else f"{max(shipped, key=lambda s: tuple(map(int, s.split('.'))))}.0"
        for v in KUBERNETES_VERSIONS
    ]


@functools.lru_cache(maxsize=4096)
def _core_errors_cached(canonical: str) -> str | None:
    obj = json.loads(canonical)
    for version in _supported_schema_versions():
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            return f"(Kubernetes {version}) {str(exc).splitlines()[0]}"
    return None


def core_errors(obj: dict[str, Any]) -> str | None:
    """Checks a core object against the official schema of every supported Kubernetes version."""
    trimmed = json.loads(json.dumps(obj))
    for key in _SERVER_FIELDS:
        trimmed.get("metadata", {}).pop(key, None)
    return _core_errors_cached(json.dumps(trimmed, sort_keys=True))


def object_errors(obj: dict[str, Any]) -> str | None:
    """What a real API server would say about an object: its CRD schema, or the built-in schemas.

    Without the reference schemas an Application is taken as it is (the tests that check it skip).
    """
    if obj.get("kind") == "Application":
        return application_errors(obj) if schemas_missing_reason() is None else None
    return core_errors(obj)
