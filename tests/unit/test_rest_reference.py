"""The REST gateway's AppHostingDeploymentCreate schema against the reference page: fields, names, types, defaults."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from apphosting_cli.rest import create_app
from apphosting_client import ClientConfig

REFERENCE = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "create-app-hosting-deployment.txt"
TYPES = {"string": "string", "number": "number", "integer": "integer", "boolean": "boolean", "object": "object"}


@dataclass(frozen=True)
class Field:
    required: bool
    type: str
    nullable: bool
    default: Any


def _type_of(line: str) -> str | None:
    if line.startswith("Array"):
        return "array"
    return TYPES.get(line)


def _fields(lines: list[str], names: list[str]) -> dict[str, Field]:
    """Reads each named field's block: `name`, [`required`], a title or `Any of:`, its type, [`default: x`]."""
    found: dict[str, Field] = {}
    at = 0
    for index, name in enumerate(names):
        at = lines.index(name, at)
        end = lines.index(names[index + 1], at + 1) if index + 1 < len(names) else len(lines)
        block = lines[at + 1 : end]
        if "VolumeConfig" in block:
            # The nested object's own fields follow; they are read separately.
            block = block[: block.index("VolumeConfig")]
        kind = next(t for t in map(_type_of, block) if t is not None)
        default: Any = None
        for line in block:
            if line.startswith("default: "):
                text = line.removeprefix("default: ")
                default = int(text) if text.isdigit() else text
        found[name] = Field(
            required=bool(block) and block[0] == "required", type=kind, nullable="Any of:" in block[:2], default=default
        )
        at += 1
    return found


@pytest.fixture(scope="module")
def reference() -> tuple[dict[str, Field], dict[str, Field]]:
    if not REFERENCE.exists():
        pytest.skip(f"the reference page is not at {REFERENCE}")
    text = REFERENCE.read_text()
    # The field names and their order, from the page's own example body.
    data = json.loads(re.search(r"--data '(\{.*\})'", text).group(1))  # type: ignore[union-attr]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    section = lines[lines.index("AppHostingDeploymentCreate") : lines.index("Successful Response")]
    top = _fields(section, list(data))
    volumes = section[section.index("VolumeConfig") : section.index("run_as_uid")]
    return top, _fields(volumes, list(data["volumes"][0]))


def _schema(document: dict[str, Any], name: str) -> dict[str, Any]:
    schema: dict[str, Any] = document["components"]["schemas"][name]
    return schema


# Fields of the create body beyond the reference's, after all of them: our API's extensions.
CREATE_EXTENSIONS = ["secret_environment_variables"]


def _compare(schema: dict[str, Any], expected: dict[str, Field], extensions: list[str] | None = None) -> None:
    assert list(schema["properties"]) == list(expected) + (extensions or [])
    assert sorted(schema.get("required", [])) == sorted(name for name, field in expected.items() if field.required)
    for name, field in expected.items():
        prop = schema["properties"][name]
        variants = prop.get("anyOf", [prop])
        kinds = [variant.get("type", "object" if "$ref" in variant else None) for variant in variants]
        assert kinds[0] == field.type, (name, prop)
        assert ("null" in kinds) == field.nullable, (name, prop)
        assert prop.get("default") == field.default, (name, prop)


def test_the_create_body_is_the_references(reference: tuple[dict[str, Field], dict[str, Field]]) -> None:
    top, volume = reference
    document = create_app(ClientConfig()).openapi()
    operation = document["paths"]["/deployments/app-hosting"]["post"]
    body_ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert body_ref.endswith("/AppHostingDeploymentCreate")
    _compare(_schema(document, "AppHostingDeploymentCreate"), top, CREATE_EXTENSIONS)
    _compare(_schema(document, "VolumeConfig"), volume)
    # Spot checks that the parse read the page as meant.
    assert top["geographic_region"] == Field(required=True, type="string", nullable=False, default=None)
    assert top["app_type"].default == "helm"
    assert top["deployment_type"].default == "docker"
    assert top["volumes"].type == "array"
    assert volume["sizeGb"].default == 10


def test_the_answer_and_errors_are_the_references() -> None:
    document = create_app(ClientConfig()).openapi()
    responses = document["paths"]["/deployments/app-hosting"]["post"]["responses"]
    assert responses["201"]["content"]["application/json"]["schema"]["$ref"].endswith("/DeploymentResponse")
    assert responses["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/HTTPValidationError")
    answer = _schema(document, "DeploymentResponse")
    assert {"id", "user_id", "cluster_id", "name", "app_type", "status", "created_at", "updated_at"} <= set(
        answer["required"]
    )
    assert answer["properties"]["id"]["format"] == "uuid"
    assert answer["properties"]["created_at"]["format"] == "date-time"
    assert _schema(document, "AppType")["enum"] == ["web_app", "api", "database", "static_site", "container", "helm"]
    assert _schema(document, "DeploymentStatus")["enum"] == [
        "pending",
        "provisioning",
        "promoting",
        "running",
        "stopped",
        "failed",
        "error",
        "migrating",
        "deleting",
    ]
    entry = _schema(document, "ValidationError")
    assert {"loc", "msg", "type"} <= set(entry["required"])
