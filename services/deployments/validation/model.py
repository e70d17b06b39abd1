"""The request model: each field's own rules, checked by pydantic, with the platform's limits as context."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Annotated, Any, Final
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
)

from apphosting import imagepolicy, images, netguard, versions, yamlbounds
from apphosting.resources import DEFAULT_VOLUME_SIZE_GB
from services.deployments.validation.checks import (
    SPACE_OR_CONTROL,
    context,
    limits_of,
    max_chars,
    no_control_chars,
    no_outer_whitespace,
    not_empty,
    one_of,
    shown,
    within,
)
from services.deployments.validation.grammars import (
    SEMVER,
)
from services.deployments.validation.violations import fail

__all__ = [
    "APP_TYPES",
    "DEPLOYMENT_TYPES",
    "ENV_NAME",
    "ENV_NAME_MAX",
    "ENV_VALUE_CONTROLS_ALLOWED",
    "HELM_ONLY_FIELDS",
    "IMAGE_UPDATE_FIELDS",
    "IMAGE_UPDATE_STRATEGIES",
    "DeploymentSpec",
    "Volume",
    "image_registry",
]

APP_TYPES: Final = ("web_app", "api", "database", "static_site", "container", "helm")
DEPLOYMENT_TYPES: Final = ("docker",)
# Argo CD Image Updater's update strategies, under their current names.
IMAGE_UPDATE_STRATEGIES: Final = ("semver", "newest-build", "alphabetical", "digest")
HELM_ONLY_FIELDS: Final = ("helm_repo_url", "helm_chart_name", "helm_chart_version", "custom_values_yaml")
IMAGE_UPDATE_FIELDS: Final = (
    "image_update_strategy",
    "image_update_constraint",
    "image_allow_tags",
    "image_ignore_tags",
)

# Helm stores the release name in a Secret label and suffixes it, hence 53 rather than 63.
DEPLOYMENT_NAME_MAX = 53
# `helm create` refuses longer names.
HELM_CHART_NAME_MAX = 250
HELM_REPO_URL_MAX = 2048
VOLUME_PURPOSE_MAX = 253
# Linux PATH_MAX; a mount path is a path.
VOLUME_PATH_MAX = 4096
# Free-form image-update fields end up in an annotation; bound them so a request cannot bloat it.
IMAGE_UPDATE_FIELD_MAX = 1024
# Longer than any name the platform could offer, short enough to quote.
SHORT_FIELD_MAX = 32
REGION_MAX = 128
# A name of IMAGE_NAME_MAX, a tag of 128 and a sha512 digest fit.
DOCKER_IMAGE_MAX = 1024
ENV_NAME_MAX = 256
UID_MAX = 2_147_483_647
PORT_MAX = 65_535

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_CHART_NAME = re.compile(r"[a-z0-9]([-a-z0-9_.]*[a-z0-9])?")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A value may hold lines (a PEM certificate) and tabs, but no other control character: NUL cannot
# reach a process environment at all, and the rest only hide what a value really says.
ENV_VALUE_CONTROLS_ALLOWED = "\t\n\r"

_FORBIDDEN_MOUNT_ROOTS: Final = ("/proc", "/sys", "/dev")
# Only encrypted transports: a chart fetched over plain http can be swapped on the way.
HELM_REPO_SCHEMES: Final = ("https", "oci")


# Each string field's length bound, checked before any other rule of the field, so an oversized
# value gets one short violation (no rule ever sees, or quotes, all of it).
MAX_CHARS: Final[Mapping[str, int]] = {
    "geographic_region": REGION_MAX,
    "deployment_name": DEPLOYMENT_NAME_MAX,
    "app_type": SHORT_FIELD_MAX,
    "docker_image": DOCKER_IMAGE_MAX,
    "deployment_type": SHORT_FIELD_MAX,
    "helm_repo_url": HELM_REPO_URL_MAX,
    "helm_chart_name": HELM_CHART_NAME_MAX,
    "helm_chart_version": IMAGE_UPDATE_FIELD_MAX,
    "image_update_strategy": SHORT_FIELD_MAX,
    "image_update_constraint": IMAGE_UPDATE_FIELD_MAX,
    "image_allow_tags": IMAGE_UPDATE_FIELD_MAX,
    "image_ignore_tags": IMAGE_UPDATE_FIELD_MAX,
    "kubernetes_version": SHORT_FIELD_MAX,
}
VOLUME_MAX_CHARS: Final[Mapping[str, int]] = {"path": VOLUME_PATH_MAX, "purpose": VOLUME_PURPOSE_MAX}


def _bounded(value: Any, maximum: int) -> Any:
    if isinstance(value, str):
        max_chars(value, maximum)
    return value


def image_registry(reference: str) -> str:
    """The registry host[:port] an image reference pulls from (docker.io when it names none)."""
    return images.registry(reference)


def _check_env_entry(value: str, info: ValidationInfo) -> str:
    name, sep, env_value = value.partition("=")
    if len(name) > ENV_NAME_MAX:
        raise fail("TOO_LONG", f"has a name of {len(name)} characters; at most {ENV_NAME_MAX} are allowed")
    if not sep:
        raise fail("INVALID_FORMAT", f"must be NAME=value (no '=' in {shown(value)})")
    if not ENV_NAME.fullmatch(name):
        raise fail(
            "INVALID_FORMAT",
            f"has name {shown(name)}; a name must match [A-Za-z_][A-Za-z0-9_]*",
        )
    maximum = limits_of(info).environment_value_max_bytes
    size = len(env_value.encode())
    if size > maximum:
        raise fail("TOO_LONG", f"has a value of {size} bytes; at most {maximum} bytes (UTF-8) are allowed")
    return value


class Volume(BaseModel):
    """A persistent volume mounted into the app."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_by_name=True, validate_by_alias=True)

    path: StrictStr
    size_gb: StrictInt = Field(DEFAULT_VOLUME_SIZE_GB, alias="sizeGb")
    purpose: StrictStr | None = None

    @field_validator(*VOLUME_MAX_CHARS, mode="before")
    @classmethod
    def _bounded(cls, value: Any, info: ValidationInfo) -> Any:
        return _bounded(value, VOLUME_MAX_CHARS[str(info.field_name)])

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if value == "":
            raise fail("REQUIRED", "is required: an absolute mount path such as /data")
        no_outer_whitespace(value)
        no_control_chars(value)
        if not value.startswith("/"):
            raise fail("INVALID_FORMAT", f"must be an absolute path (start with /), got {shown(value)}")
        if value == "/":
            raise fail("NOT_ALLOWED", "must not be / (a volume cannot replace the container's root)")
        if any(part in ("", ".", "..") for part in value[1:].split("/")):
            raise fail(
                "INVALID_FORMAT",
                f"must be a normalized path: no '.', '..', '//' or trailing '/', got {shown(value)}",
            )
        for root in _FORBIDDEN_MOUNT_ROOTS:
            if value == root or value.startswith(root + "/"):
                raise fail(
                    "NOT_ALLOWED",
                    f"must not be under {', '.join(_FORBIDDEN_MOUNT_ROOTS)} (kernel filesystems), got {shown(value)}",
                )
        return value

    @field_validator("size_gb")
    @classmethod
    def _size_gb(cls, value: int, info: ValidationInfo) -> int:
        within(value, 1, limits_of(info).volume_size_gb_max, " GiB")
        return value

    @field_validator("purpose")
    @classmethod
    def _purpose(cls, value: str | None) -> str | None:
        if value is not None:
            no_control_chars(value)
        return value


class DeploymentSpec(BaseModel):
    """A validated create request; field names are the REST contract's. Build it with `validate_create`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    geographic_region: StrictStr
    deployment_name: StrictStr
    app_type: StrictStr = "helm"
    config: dict[StrictStr, Any] | None = None
    cpu_request: StrictFloat | None = Field(None, allow_inf_nan=False)
    memory_request_mb: StrictInt | None = None
    replicas: StrictInt | None = None
    container_port: StrictInt | None = None
    environment_variables: list[Annotated[StrictStr, AfterValidator(_check_env_entry)]] | None = None
    docker_image: StrictStr | None = None
    storage_size_gb: StrictInt | None = None
    volumes: list[Volume] | None = None
    run_as_uid: StrictInt | None = None
    deployment_type: StrictStr = "docker"
    helm_repo_url: StrictStr | None = None
    helm_chart_name: StrictStr | None = None
    helm_chart_version: StrictStr | None = None
    custom_values_yaml: StrictStr | None = None
    image_update_strategy: StrictStr | None = None
    image_update_constraint: StrictStr | None = None
    image_allow_tags: StrictStr | None = None
    image_ignore_tags: StrictStr | None = None
    kubernetes_version: StrictStr | None = None

    @field_validator(*MAX_CHARS, mode="before")
    @classmethod
    def _bounded(cls, value: Any, info: ValidationInfo) -> Any:
        return _bounded(value, MAX_CHARS[str(info.field_name)])

    def env_dict(self) -> dict[str, str]:
        """The environment variables as NAME -> value (a value may itself contain '=')."""
        pairs = (entry.partition("=") for entry in self.environment_variables or ())
        return {name: value for name, _, value in pairs}

    @field_validator("geographic_region")
    @classmethod
    def _geographic_region(cls, value: str, info: ValidationInfo) -> str:
        if value == "":
            raise fail("REQUIRED", "is required")
        no_outer_whitespace(value)
        regions = context(info).get("regions")
        # Without a context (a stored spec read back) the region list is not known here.
        if regions is not None and value not in regions:
            offered = ", ".join(sorted(regions)) or "none are available"
            raise fail("UNSUPPORTED", f"must be one of {offered}; got {shown(value)}")
        return value

    @field_validator("deployment_name")
    @classmethod
    def _deployment_name(cls, value: str) -> str:
        if value == "":
            raise fail("REQUIRED", "is required")
        no_outer_whitespace(value)
        if not _DNS_LABEL.fullmatch(value):
            raise fail(
                "INVALID_FORMAT",
                "must be a DNS-1123 label: lowercase letters, digits and '-', "
                f"starting and ending with a letter or digit; got {shown(value)}",
            )
        return value

    @field_validator("app_type")
    @classmethod
    def _app_type(cls, value: str) -> str:
        return one_of(value, APP_TYPES)

    @field_validator("deployment_type")
    @classmethod
    def _deployment_type(cls, value: str) -> str:
        if value not in DEPLOYMENT_TYPES:
            raise fail(
                "UNSUPPORTED",
                f"must be one of {', '.join(DEPLOYMENT_TYPES)} (a prebuilt image from a registry); "
                f"{shown(value)} is not supported",
            )
        return value

    @field_validator("config")
    @classmethod
    def _config(cls, value: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        if value is None:
            return value
        try:
            # NaN and Infinity are measured here and named, with their path, by the cross-field rules.
            encoded = json.dumps(value, separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:
            raise fail("INVALID_TYPE", f"must be a JSON object ({exc})") from None
        maximum = limits_of(info).config_max_bytes
        if len(encoded) > maximum:
            raise fail("TOO_LONG", f"must be at most {maximum} bytes as JSON, got {len(encoded)}")
        deepest = limits_of(info).config_max_depth
        if _nesting(value, deepest) > deepest:
            raise fail("TOO_DEEP", f"must nest objects and lists at most {deepest} levels deep")
        return value

    @field_validator("cpu_request")
    @classmethod
    def _cpu_request(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is None:
            return value
        maximum = limits_of(info).cpu_request_max
        if not 0 < value <= maximum:
            raise fail("OUT_OF_RANGE", f"must be greater than 0 and at most {maximum} cores, got {value}")
        # Kubernetes quantities stop at millicores; anything finer would be rounded behind the user's back.
        if abs(value * 1000 - round(value * 1000)) > 1e-6:
            raise fail("TOO_PRECISE", f"must be a whole number of millicores (0.001 steps), got {value}")
        return value

    @field_validator("memory_request_mb")
    @classmethod
    def _memory_request_mb(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None:
            limits = limits_of(info)
            within(value, limits.memory_request_mb_min, limits.memory_request_mb_max, " MB")
        return value

    @field_validator("replicas")
    @classmethod
    def _replicas(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None:
            within(value, 1, limits_of(info).replicas_max)
        return value

    @field_validator("container_port")
    @classmethod
    def _container_port(cls, value: int | None) -> int | None:
        if value is not None:
            within(value, 1, PORT_MAX)
        return value

    @field_validator("storage_size_gb")
    @classmethod
    def _storage_size_gb(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None:
            within(value, 1, limits_of(info).storage_size_gb_max, " GiB")
        return value

    @field_validator("run_as_uid")
    @classmethod
    def _run_as_uid(cls, value: int | None) -> int | None:
        if value == 0:
            raise fail("NOT_ALLOWED", f"must not be 0: root is not allowed; use a uid from 1 to {UID_MAX}")
        if value is not None:
            within(value, 1, UID_MAX)
        return value

    @field_validator("docker_image")
    @classmethod
    def _docker_image(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        not_empty(value)
        no_outer_whitespace(value)
        problem = images.problem(value)
        if problem is not None:
            raise fail(*problem)
        registries = limits_of(info).image_registries
        registry = image_registry(value)
        if not netguard.host_allowed(registry, registries):
            raise fail(
                "NOT_ALLOWED",
                f"must come from an allowed registry ({', '.join(registries)}); {shown(value)} is on {registry}",
            )
        return value

    @field_validator("helm_repo_url")
    @classmethod
    def _helm_repo_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        not_empty(value)
        no_outer_whitespace(value)
        allowed = "an absolute https:// or oci:// URL with a host"
        if SPACE_OR_CONTROL.search(value):
            raise fail("INVALID_FORMAT", f"must be {allowed}; it contains whitespace or control characters")
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - parsing the port is what validates it
        except ValueError as exc:
            raise fail("INVALID_FORMAT", f"must be {allowed} ({exc})") from None
        if parts.scheme == "http":
            raise fail("NOT_ALLOWED", f"must be {allowed}: plain http is not allowed, use https")
        if parts.scheme not in HELM_REPO_SCHEMES or not parts.hostname:
            raise fail("INVALID_FORMAT", f"must be {allowed}, got {shown(value)}")
        # The URL is stored and echoed back in responses; credentials must not ride along in it.
        if parts.username is not None or parts.password is not None:
            raise fail("NOT_ALLOWED", "must not contain credentials (user:password@)")
        problem = netguard.host_problem(parts.hostname, allowed=limits_of(info).helm_repo_hosts)
        if problem is not None:
            raise fail("NOT_ALLOWED", f"must name a public host the platform may fetch from; {problem}")
        return value

    @field_validator("helm_chart_name")
    @classmethod
    def _helm_chart_name(cls, value: str | None) -> str | None:
        if value is None:
            return value
        not_empty(value)
        no_outer_whitespace(value)
        if not _CHART_NAME.fullmatch(value):
            raise fail(
                "INVALID_FORMAT",
                "must be a chart name: lowercase letters, digits, '-', '_' and '.', "
                f"starting and ending with a letter or digit; got {shown(value)}",
            )
        return value

    @field_validator("helm_chart_version")
    @classmethod
    def _helm_chart_version(cls, value: str | None) -> str | None:
        if value is None:
            return value
        not_empty(value)
        no_outer_whitespace(value)
        if not SEMVER.fullmatch(value):
            raise fail(
                "INVALID_FORMAT",
                f"must be a SemVer 2.0 version such as 1.2.3 or v1.2.3-rc.1, got {shown(value)}",
            )
        return value

    @field_validator("custom_values_yaml")
    @classmethod
    def _custom_values_yaml(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        maximum = limits_of(info).custom_values_yaml_max_bytes
        size = len(value.encode())
        if size > maximum:
            raise fail("TOO_LONG", f"must be at most {maximum} bytes, got {size}")
        try:
            loaded = yamlbounds.load(value, limits_of(info))
        except yamlbounds.TooBig as exc:
            raise fail(exc.reason, exc.message) from None
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
            raise fail("INVALID_FORMAT", f"must be valid YAML; it does not parse{at}") from None
        except ValueError as exc:
            # A scalar the constructor cannot hold, e.g. an integer of more than 4300 digits.
            raise fail("INVALID_FORMAT", f"must be valid YAML; a value cannot be read ({str(exc)[:120]})") from None
        # An empty document means "no values", the same as leaving the field out.
        if loaded is not None and not isinstance(loaded, dict):
            raise fail(
                "INVALID_FORMAT",
                f"must be a YAML mapping (key: value pairs), got a {type(loaded).__name__}",
            )
        return value

    @field_validator("image_update_strategy")
    @classmethod
    def _image_update_strategy(cls, value: str | None) -> str | None:
        if value is not None:
            one_of(value, IMAGE_UPDATE_STRATEGIES)
        return value

    @field_validator("image_update_constraint")
    @classmethod
    def _image_update_constraint(cls, value: str | None) -> str | None:
        # Its shape depends on the strategy; that is checked with the other cross-field rules.
        if value is not None:
            not_empty(value)
            no_outer_whitespace(value)
            no_control_chars(value)
        return value

    @field_validator("image_allow_tags")
    @classmethod
    def _image_allow_tags(cls, value: str | None) -> str | None:
        if value is None or value == "any":
            return value
        no_control_chars(value)
        allowed = "must be 'any' or 'regexp:<pattern>'"
        if not value.startswith("regexp:"):
            raise fail("INVALID_FORMAT", f"{allowed}, got {shown(value)}")
        pattern = value.removeprefix("regexp:")
        if pattern == "":
            raise fail("INVALID_FORMAT", f"{allowed} with a non-empty pattern")
        try:
            # The updater's own reading of the pattern, as Go's RE2 reads it (apphosting.imagepolicy).
            imagepolicy.compile_re2(pattern)
        except imagepolicy.PolicyError as exc:
            why = _short(exc)
            try:
                re.compile(pattern)
            except re.error:
                raise fail("INVALID_FORMAT", f"{allowed}; {why}") from None
            raise fail("UNSUPPORTED", f"{allowed} in RE2 syntax (no lookaround or backreferences); {why}") from None
        return value

    @field_validator("image_ignore_tags")
    @classmethod
    def _image_ignore_tags(cls, value: str | None) -> str | None:
        if value is None:
            return value
        no_control_chars(value)
        allowed = "must be comma-separated glob patterns such as '*-rc*,latest'"
        for pattern in value.split(","):
            if pattern == "":
                raise fail("INVALID_FORMAT", f"{allowed}; it has an empty pattern")
            if pattern != pattern.strip():
                raise fail("INVALID_FORMAT", f"{allowed}, without spaces around them; got {shown(pattern)}")
            try:
                imagepolicy.glob_to_regex(pattern)
            except imagepolicy.PolicyError as exc:
                raise fail("INVALID_FORMAT", f"{allowed}; {_short(exc)}") from None
        return value

    @field_validator("kubernetes_version")
    @classmethod
    def _kubernetes_version(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        supported = limits_of(info).kubernetes_versions
        offered = ", ".join(supported)
        parsed = versions.parse(value)
        if parsed is None:
            raise fail("INVALID_FORMAT", f"must look like 1.N or 1.N.P (one of {offered}), got {shown(value)}")
        if parsed[0] not in supported:
            raise fail("UNSUPPORTED", f"must be one of the supported versions {offered}, got {shown(value)}")
        return value


def _short(error: Exception) -> str:
    """A reader's reason, which may quote a long value, cut to a line."""
    text = str(error)
    return text if len(text) <= 120 else text[:117] + "..."


def _nesting(value: Any, limit: int) -> int:
    """How deep lists and objects nest in a JSON value; stops counting past `limit`."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, dict | list):
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children)
    return deepest
