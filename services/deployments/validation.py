"""Validation of a create request: every rule of the REST contract plus the platform's bounds, all at once."""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
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
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from apphosting import netguard
from apphosting.settings import Limits

__all__ = [
    "APP_TYPES",
    "DEPLOYMENT_TYPES",
    "IMAGE_UPDATE_STRATEGIES",
    "DeploymentSpec",
    "SpecInvalid",
    "Violation",
    "Volume",
    "validate_create",
    "validate_create_resolving",
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

# The contract's field order: violations are reported in it so a client reads them top to bottom.
FIELD_ORDER: Final = (
    "geographic_region",
    "deployment_name",
    "app_type",
    "config",
    "cpu_request",
    "memory_request_mb",
    "replicas",
    "container_port",
    "environment_variables",
    "docker_image",
    "storage_size_gb",
    "volumes",
    "run_as_uid",
    "deployment_type",
    "helm_repo_url",
    "helm_chart_name",
    "helm_chart_version",
    "custom_values_yaml",
    "image_update_strategy",
    "image_update_constraint",
    "image_allow_tags",
    "image_ignore_tags",
    "kubernetes_version",
)
VOLUME_FIELD_ORDER: Final = ("path", "sizeGb", "purpose")

# Helm stores the release name in a Secret label and suffixes it, hence 53 rather than 63.
DEPLOYMENT_NAME_MAX = 53
# `helm create` refuses longer names.
HELM_CHART_NAME_MAX = 250
HELM_REPO_URL_MAX = 2048
# distribution/reference's NameTotalLengthMax.
IMAGE_NAME_MAX = 255
VOLUME_PURPOSE_MAX = 253
# Linux PATH_MAX; a mount path is a path.
VOLUME_PATH_MAX = 4096
# Free-form image-update fields end up in an annotation; bound them so a request cannot bloat it.
IMAGE_UPDATE_FIELD_MAX = 1024
UID_MAX = 2_147_483_647
PORT_MAX = 65_535

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_CHART_NAME = re.compile(r"[a-z0-9]([-a-z0-9_.]*[a-z0-9])?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUM = r"(?:0|[1-9][0-9]*)"
_PRERELEASE_ID = r"(?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)"
_SEMVER = re.compile(
    rf"v?{_NUM}\.{_NUM}\.{_NUM}"
    rf"(?:-{_PRERELEASE_ID}(?:\.{_PRERELEASE_ID})*)?"
    r"(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?"
)
_KUBERNETES_VERSION = re.compile(rf"v?1\.({_NUM})(?:\.{_NUM})?")

# distribution/reference's grammar, spelled out with ASCII classes (Go's \w is ASCII-only).
_DOMAIN_COMPONENT = r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9A-Fa-f:]+\])(?::[0-9]+)?"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE_NAME = re.compile(rf"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128}")

# Masterminds/semver (what Image Updater uses) constraints: versions may be partial or wildcards.
_CONSTRAINT_OP = r"(?:!=|>=|=>|<=|=<|~>|\^|=|>|<|~)"
_CONSTRAINT_VERSION = (
    r"v?(?:[0-9]+|[xX*])(?:\.(?:[0-9]+|[xX*])){0,2}"
    r"(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?"
)
_CONSTRAINT_TERM = re.compile(rf"{_CONSTRAINT_OP}?{_CONSTRAINT_VERSION}")
_CONSTRAINT_HYPHEN_RANGE = re.compile(rf"{_CONSTRAINT_VERSION}\s+-\s+{_CONSTRAINT_VERSION}")
# Image Updater compiles allow-tags with Go's RE2, which has neither lookaround nor backreferences.
_RE2_UNSUPPORTED = re.compile(r"\(\?<?[=!]|(?<!\\)(?:\\\\)*\\[1-9]")

_FORBIDDEN_MOUNT_ROOTS: Final = ("/proc", "/sys", "/dev")
# Only encrypted transports: a chart fetched over plain http can be swapped on the way.
HELM_REPO_SCHEMES: Final = ("https", "oci")
# distribution/reference: an image name without a registry part is on Docker Hub.
DEFAULT_REGISTRY: Final = "docker.io"


@dataclass(frozen=True)
class Violation:
    """One broken rule: where (a field path), what is wrong and allowed, and a stable machine code."""

    field: str
    description: str
    reason: str


class SpecInvalid(Exception):
    """A create request broke one or more rules; `violations` holds all of them in request field order."""

    def __init__(self, violations: Collection[Violation]) -> None:
        self.violations: tuple[Violation, ...] = tuple(violations)
        super().__init__("; ".join(v.description for v in self.violations))


# Reasons are part of the API; pydantic's own error types are an implementation detail, so they are
# translated here and anything unforeseen falls back to a generic code instead of leaking through.
_PYDANTIC_REASONS: Final[Mapping[str, str]] = {
    "missing": "REQUIRED",
    "extra_forbidden": "UNKNOWN_FIELD",
    "finite_number": "INVALID_FORMAT",
}
_TYPE_NAMES: Final[Mapping[str, str]] = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "int_parsing": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "dict_type": "a JSON object",
    "list_type": "a list",
    "model_type": "an object with path, sizeGb and purpose",
    "model_attributes_type": "an object with path, sizeGb and purpose",
}


def _fail(reason: str, message: str) -> PydanticCustomError:
    # The error type carries our reason verbatim; the message is completed with the field path later.
    # The message goes in as context, not as the template, so braces in user input are not placeholders.
    return PydanticCustomError(reason, "{detail}", {"detail": message})


def _context(info: ValidationInfo) -> Mapping[str, Any]:
    return info.context if isinstance(info.context, Mapping) else {}


def _limits(info: ValidationInfo) -> Limits:
    limits = _context(info).get("limits")
    # Without a context (a stored spec read back) the default bounds apply.
    return limits if isinstance(limits, Limits) else Limits()


def _no_outer_whitespace(value: str) -> str:
    if value != value.strip():
        raise _fail("INVALID_FORMAT", "must not have leading or trailing whitespace (it is not stripped)")
    return value


def _not_empty(value: str) -> str:
    if value == "":
        raise _fail("INVALID_FORMAT", "must not be empty; leave the field unset instead")
    return value


def _max_chars(value: str, maximum: int) -> str:
    if len(value) > maximum:
        raise _fail("TOO_LONG", f"must be at most {maximum} characters, got {len(value)}")
    return value


def _range(value: float, low: float, high: float, unit: str = "") -> None:
    if not low <= value <= high:
        raise _fail("OUT_OF_RANGE", f"must be between {low} and {high}{unit}, got {value}")


def _one_of(value: str, allowed: Collection[str], reason: str = "UNSUPPORTED") -> str:
    if value not in allowed:
        raise _fail(reason, f"must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _check_env_entry(value: str, info: ValidationInfo) -> str:
    name, sep, env_value = value.partition("=")
    if not sep:
        raise _fail("INVALID_FORMAT", f"must be NAME=value (no '=' in {value[:64]!r})")
    if not _ENV_NAME.fullmatch(name):
        raise _fail(
            "INVALID_FORMAT",
            f"has name {name[:64]!r}; a name must match [A-Za-z_][A-Za-z0-9_]*",
        )
    maximum = _limits(info).environment_value_max_bytes
    size = len(env_value.encode())
    if size > maximum:
        raise _fail("TOO_LONG", f"has a value of {size} bytes; at most {maximum} bytes (UTF-8) are allowed")
    return value


class Volume(BaseModel):
    """A persistent volume mounted into the app."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_by_name=True, validate_by_alias=True)

    path: StrictStr
    size_gb: StrictInt = Field(10, alias="sizeGb")
    purpose: StrictStr | None = None

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if value == "":
            raise _fail("REQUIRED", "is required: an absolute mount path such as /data")
        _no_outer_whitespace(value)
        _max_chars(value, VOLUME_PATH_MAX)
        if any(ord(c) < 32 or c == "\x7f" for c in value):
            raise _fail("INVALID_FORMAT", "must not contain control characters")
        if not value.startswith("/"):
            raise _fail("INVALID_FORMAT", f"must be an absolute path (start with /), got {value!r}")
        if value == "/":
            raise _fail("NOT_ALLOWED", "must not be / (a volume cannot replace the container's root)")
        if any(part in ("", ".", "..") for part in value[1:].split("/")):
            raise _fail(
                "INVALID_FORMAT",
                f"must be a normalized path: no '.', '..', '//' or trailing '/', got {value!r}",
            )
        for root in _FORBIDDEN_MOUNT_ROOTS:
            if value == root or value.startswith(root + "/"):
                raise _fail(
                    "NOT_ALLOWED",
                    f"must not be under {', '.join(_FORBIDDEN_MOUNT_ROOTS)} (kernel filesystems), got {value!r}",
                )
        return value

    @field_validator("size_gb")
    @classmethod
    def _size_gb(cls, value: int, info: ValidationInfo) -> int:
        _range(value, 1, _limits(info).volume_size_gb_max, " GiB")
        return value

    @field_validator("purpose")
    @classmethod
    def _purpose(cls, value: str | None) -> str | None:
        if value is not None:
            _max_chars(value, VOLUME_PURPOSE_MAX)
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

    def env_dict(self) -> dict[str, str]:
        """The environment variables as NAME -> value (a value may itself contain '=')."""
        pairs = (entry.partition("=") for entry in self.environment_variables or ())
        return {name: value for name, _, value in pairs}

    @field_validator("geographic_region")
    @classmethod
    def _geographic_region(cls, value: str, info: ValidationInfo) -> str:
        if value == "":
            raise _fail("REQUIRED", "is required")
        _no_outer_whitespace(value)
        regions = _context(info).get("regions")
        # Without a context (a stored spec read back) the region list is not known here.
        if regions is not None and value not in regions:
            offered = ", ".join(sorted(regions)) or "none are available"
            raise _fail("UNSUPPORTED", f"must be one of {offered}; got {value!r}")
        return value

    @field_validator("deployment_name")
    @classmethod
    def _deployment_name(cls, value: str) -> str:
        if value == "":
            raise _fail("REQUIRED", "is required")
        _no_outer_whitespace(value)
        _max_chars(value, DEPLOYMENT_NAME_MAX)
        if not _DNS_LABEL.fullmatch(value):
            raise _fail(
                "INVALID_FORMAT",
                "must be a DNS-1123 label: lowercase letters, digits and '-', "
                f"starting and ending with a letter or digit; got {value!r}",
            )
        return value

    @field_validator("app_type")
    @classmethod
    def _app_type(cls, value: str) -> str:
        return _one_of(value, APP_TYPES)

    @field_validator("deployment_type")
    @classmethod
    def _deployment_type(cls, value: str) -> str:
        if value not in DEPLOYMENT_TYPES:
            raise _fail(
                "UNSUPPORTED",
                f"must be one of {', '.join(DEPLOYMENT_TYPES)} (a prebuilt image from a registry); "
                f"{value!r} is not supported",
            )
        return value

    @field_validator("config")
    @classmethod
    def _config(cls, value: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        if value is None:
            return value
        try:
            encoded = json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise _fail("INVALID_TYPE", f"must be a JSON object ({exc})") from None
        maximum = _limits(info).config_max_bytes
        if len(encoded) > maximum:
            raise _fail("TOO_LONG", f"must be at most {maximum} bytes as JSON, got {len(encoded)}")
        deepest = _limits(info).config_max_depth
        if _nesting(value, deepest) > deepest:
            raise _fail("TOO_DEEP", f"must nest objects and lists at most {deepest} levels deep")
        return value

    @field_validator("cpu_request")
    @classmethod
    def _cpu_request(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is None:
            return value
        maximum = _limits(info).cpu_request_max
        if not 0 < value <= maximum:
            raise _fail("OUT_OF_RANGE", f"must be greater than 0 and at most {maximum} cores, got {value}")
        # Kubernetes quantities stop at millicores; anything finer would be rounded behind the user's back.
        if abs(value * 1000 - round(value * 1000)) > 1e-6:
            raise _fail("TOO_PRECISE", f"must be a whole number of millicores (0.001 steps), got {value}")
        return value

    @field_validator("memory_request_mb")
    @classmethod
    def _memory_request_mb(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None:
            limits = _limits(info)
            _range(value, limits.memory_request_mb_min, limits.memory_request_mb_max, " MB")
        return value

    @field_validator("replicas")
    @classmethod
    def _replicas(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None:
            _range(value, 1, _limits(info).replicas_max)
        return value

    @field_validator("container_port")
    @classmethod
    def _container_port(cls, value: int | None) -> int | None:
        if value is not None:
            _range(value, 1, PORT_MAX)
        return value

    @field_validator("storage_size_gb")
    @classmethod
    def _storage_size_gb(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None:
            _range(value, 1, _limits(info).storage_size_gb_max, " GiB")
        return value

    @field_validator("run_as_uid")
    @classmethod
    def _run_as_uid(cls, value: int | None) -> int | None:
        if value == 0:
            raise _fail("NOT_ALLOWED", f"must not be 0: root is not allowed; use a uid from 1 to {UID_MAX}")
        if value is not None:
            _range(value, 1, UID_MAX)
        return value

    @field_validator("docker_image")
    @classmethod
    def _docker_image(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        _not_empty(value)
        _no_outer_whitespace(value)
        problem = _image_reference_problem(value)
        if problem is not None:
            raise _fail(*problem)
        registries = _limits(info).image_registries
        registry = image_registry(value)
        if not netguard.host_allowed(registry, registries):
            raise _fail(
                "NOT_ALLOWED",
                f"must come from an allowed registry ({', '.join(registries)}); {value!r} is on {registry}",
            )
        return value

    @field_validator("helm_repo_url")
    @classmethod
    def _helm_repo_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        _not_empty(value)
        _no_outer_whitespace(value)
        _max_chars(value, HELM_REPO_URL_MAX)
        allowed = "an absolute https:// or oci:// URL with a host"
        if any(c.isspace() or ord(c) < 32 or c == "\x7f" for c in value):
            raise _fail("INVALID_FORMAT", f"must be {allowed}; it contains whitespace or control characters")
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - parsing the port is what validates it
        except ValueError as exc:
            raise _fail("INVALID_FORMAT", f"must be {allowed} ({exc})") from None
        if parts.scheme == "http":
            raise _fail("NOT_ALLOWED", f"must be {allowed}: plain http is not allowed, use https")
        if parts.scheme not in HELM_REPO_SCHEMES or not parts.hostname:
            raise _fail("INVALID_FORMAT", f"must be {allowed}, got {value!r}")
        # The URL is stored and echoed back in responses; credentials must not ride along in it.
        if parts.username is not None or parts.password is not None:
            raise _fail("NOT_ALLOWED", "must not contain credentials (user:password@)")
        problem = netguard.host_problem(parts.hostname, allowed=_limits(info).helm_repo_hosts)
        if problem is not None:
            raise _fail("NOT_ALLOWED", f"must name a public host the platform may fetch from; {problem}")
        return value

    @field_validator("helm_chart_name")
    @classmethod
    def _helm_chart_name(cls, value: str | None) -> str | None:
        if value is None:
            return value
        _not_empty(value)
        _no_outer_whitespace(value)
        _max_chars(value, HELM_CHART_NAME_MAX)
        if not _CHART_NAME.fullmatch(value):
            raise _fail(
                "INVALID_FORMAT",
                "must be a chart name: lowercase letters, digits, '-', '_' and '.', "
                f"starting and ending with a letter or digit; got {value!r}",
            )
        return value

    @field_validator("helm_chart_version")
    @classmethod
    def _helm_chart_version(cls, value: str | None) -> str | None:
        if value is None:
            return value
        _not_empty(value)
        _no_outer_whitespace(value)
        _max_chars(value, IMAGE_UPDATE_FIELD_MAX)
        if not _SEMVER.fullmatch(value):
            raise _fail(
                "INVALID_FORMAT",
                f"must be a SemVer 2.0 version such as 1.2.3 or v1.2.3-rc.1, got {value!r}",
            )
        return value

    @field_validator("custom_values_yaml")
    @classmethod
    def _custom_values_yaml(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        maximum = _limits(info).custom_values_yaml_max_bytes
        size = len(value.encode())
        if size > maximum:
            raise _fail("TOO_LONG", f"must be at most {maximum} bytes, got {size}")
        try:
            loaded = _load_bounded_yaml(value, _limits(info))
        except _YamlTooBig as exc:
            raise _fail(exc.reason, exc.message) from None
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
            raise _fail("INVALID_FORMAT", f"must be valid YAML; it does not parse{at}") from None
        except ValueError as exc:
            # A scalar the constructor cannot hold, e.g. an integer of more than 4300 digits.
            raise _fail("INVALID_FORMAT", f"must be valid YAML; a value cannot be read ({str(exc)[:120]})") from None
        # An empty document means "no values", the same as leaving the field out.
        if loaded is not None and not isinstance(loaded, dict):
            raise _fail(
                "INVALID_FORMAT",
                f"must be a YAML mapping (key: value pairs), got a {type(loaded).__name__}",
            )
        return value

    @field_validator("image_update_strategy")
    @classmethod
    def _image_update_strategy(cls, value: str | None) -> str | None:
        if value is not None:
            _one_of(value, IMAGE_UPDATE_STRATEGIES)
        return value

    @field_validator("image_update_constraint")
    @classmethod
    def _image_update_constraint(cls, value: str | None) -> str | None:
        # Its shape depends on the strategy; that is checked with the other cross-field rules.
        if value is not None:
            _not_empty(value)
            _no_outer_whitespace(value)
            _max_chars(value, IMAGE_UPDATE_FIELD_MAX)
        return value

    @field_validator("image_allow_tags")
    @classmethod
    def _image_allow_tags(cls, value: str | None) -> str | None:
        if value is None or value == "any":
            return value
        _max_chars(value, IMAGE_UPDATE_FIELD_MAX)
        allowed = "must be 'any' or 'regexp:<pattern>'"
        if not value.startswith("regexp:"):
            raise _fail("INVALID_FORMAT", f"{allowed}, got {value[:64]!r}")
        pattern = value.removeprefix("regexp:")
        if pattern == "":
            raise _fail("INVALID_FORMAT", f"{allowed} with a non-empty pattern")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise _fail("INVALID_FORMAT", f"{allowed}; the pattern does not compile: {exc}") from None
        if _RE2_UNSUPPORTED.search(pattern):
            raise _fail(
                "UNSUPPORTED",
                f"{allowed} in RE2 syntax; lookaround and backreferences are not supported",
            )
        return value

    @field_validator("image_ignore_tags")
    @classmethod
    def _image_ignore_tags(cls, value: str | None) -> str | None:
        if value is None:
            return value
        _max_chars(value, IMAGE_UPDATE_FIELD_MAX)
        allowed = "must be comma-separated glob patterns such as '*-rc*,latest'"
        for pattern in value.split(","):
            if pattern == "":
                raise _fail("INVALID_FORMAT", f"{allowed}; it has an empty pattern")
            if pattern != pattern.strip():
                raise _fail("INVALID_FORMAT", f"{allowed}, without spaces around them; got {pattern!r}")
            if not _glob_brackets_closed(pattern):
                raise _fail("INVALID_FORMAT", f"{allowed}; {pattern!r} has an unclosed '['")
        return value

    @field_validator("kubernetes_version")
    @classmethod
    def _kubernetes_version(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        supported = _limits(info).kubernetes_versions
        offered = ", ".join(supported)
        match = _KUBERNETES_VERSION.fullmatch(value)
        if match is None:
            raise _fail("INVALID_FORMAT", f"must look like 1.N or 1.N.P (one of {offered}), got {value!r}")
        if f"1.{match.group(1)}" not in supported:
            raise _fail("UNSUPPORTED", f"must be one of the supported versions {offered}, got {value!r}")
        return value


def image_registry(reference: str) -> str:
    """The registry host[:port] an image reference pulls from (docker.io when it names none)."""
    first, slash, _ = reference.partition("/")
    # distribution/reference: the first component is a registry when it looks like a host.
    if slash and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        return first
    return DEFAULT_REGISTRY


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


class _YamlTooBig(yaml.YAMLError):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses deep nesting and many aliases while composing, before anything is built."""

    def __init__(self, stream: str, limits: Limits) -> None:
        super().__init__(stream)
        self._limits = limits
        self._depth = 0
        self._aliases = 0

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > self._limits.custom_values_yaml_max_aliases:
                raise _YamlTooBig(
                    "TOO_LONG", f"must use at most {self._limits.custom_values_yaml_max_aliases} aliases (*name)"
                )
        self._depth += 1
        try:
            if self._depth > self._limits.custom_values_yaml_max_depth:
                raise _YamlTooBig(
                    "TOO_DEEP", f"must nest at most {self._limits.custom_values_yaml_max_depth} levels deep"
                )
            return super().compose_node(parent, index)  # type: ignore[arg-type]
        finally:
            self._depth -= 1


def _expanded_nodes(root: yaml.Node, limit: int) -> int | None:
    """Nodes of the document with every alias expanded (stops past `limit`); None when an alias recurses."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        children = _children(node)
        if done:
            on_path.discard(key)
            sizes[key] = min(limit + 1, 1 + sum(sizes[id(child)] for child in children))
            continue
        if key in sizes:
            continue
        if key in on_path:
            return None
        on_path.add(key)
        stack.append((node, True))
        for child in children:
            if id(child) in on_path:
                return None
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _load_bounded_yaml(text: str, limits: Limits) -> Any:
    """yaml.safe_load with bounded depth, aliases and expanded size; raises _YamlTooBig or a YAMLError."""
    loader = _BoundedLoader(text, limits)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        maximum = limits.custom_values_yaml_max_nodes
        expanded = _expanded_nodes(node, maximum)
        if expanded is None:
            raise _YamlTooBig("INVALID_FORMAT", "must not contain an alias that refers to itself (a cycle)")
        if expanded > maximum:
            raise _YamlTooBig(
                "TOO_LONG", f"must hold at most {maximum} values once its aliases are expanded (alias bomb?)"
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _image_reference_problem(value: str) -> tuple[str, str] | None:
    """What is wrong with an image reference (reason, message), or None when it is valid."""
    allowed = (
        "must be an image reference like nginx:1.27, ghcr.io/acme/web:v1.2.3 or "
        "registry.example.com:5000/team/app@sha256:<64 hex>; "
    )
    rest, at, digest = value.partition("@")
    if at and not _DIGEST.fullmatch(digest):
        return "INVALID_FORMAT", allowed + f"the digest {digest[:80]!r} is not sha256:<64 lowercase hex>"
    name, tag = rest, None
    # A ':' after the last '/' starts a tag; one before it belongs to a registry port.
    colon = rest.rfind(":")
    if colon > rest.rfind("/"):
        name, tag = rest[:colon], rest[colon + 1 :]
    if tag is not None and not _TAG.fullmatch(tag):
        return "INVALID_FORMAT", allowed + f"the tag {tag[:140]!r} is not [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}"
    if len(name) > IMAGE_NAME_MAX:
        return "TOO_LONG", allowed + f"the name must be at most {IMAGE_NAME_MAX} characters, got {len(name)}"
    if not _IMAGE_NAME.fullmatch(name):
        return "INVALID_FORMAT", allowed + (
            f"{name[:80]!r} is not a valid name (lowercase path components separated by '/', "
            "joined by '.', '_', '__' or '-', after an optional registry host[:port])"
        )
    return None


def _glob_brackets_closed(pattern: str) -> bool:
    depth_open = False
    escaped = False
    for char in pattern:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "[":
            depth_open = True
        elif char == "]":
            depth_open = False
    return not depth_open


def _semver_constraint_ok(value: str) -> bool:
    for alternative in value.split("||"):
        alternative = alternative.strip()
        if alternative == "":
            return False
        if _CONSTRAINT_HYPHEN_RANGE.fullmatch(alternative):
            continue
        # ">= 1.0" is one comparison: glue operators to their version before splitting on spaces.
        glued = re.sub(rf"({_CONSTRAINT_OP})\s+", r"\1", alternative)
        terms = re.split(r"\s*,\s*|\s+", glued)
        if not terms or not all(_CONSTRAINT_TERM.fullmatch(term) for term in terms):
            return False
    return True


Loc = tuple[str | int, ...]


def _cross_field(data: Mapping[str, Any], limits: Limits) -> Iterator[tuple[Loc, str, str]]:
    """Rules spanning fields or list entries, on the raw data so they run even when fields are invalid."""
    app_type = data.get("app_type", "helm")
    image_set = "docker_image" in data

    if app_type == "helm":
        for field in ("helm_repo_url", "helm_chart_name"):
            if field not in data:
                yield (field,), "REQUIRED", "is required when app_type is helm"
    elif isinstance(app_type, str) and app_type in APP_TYPES:
        if not image_set:
            yield ("docker_image",), "REQUIRED", f"is required when app_type is {app_type} (not helm)"
        for field in HELM_ONLY_FIELDS:
            if field in data:
                yield (
                    (field,),
                    "NOT_ALLOWED",
                    f"must not be set when app_type is {app_type}; it applies only to app_type helm",
                )
    if app_type == "database" and "storage_size_gb" not in data and not data.get("volumes"):
        yield (
            ("storage_size_gb",),
            "REQUIRED",
            "is required when app_type is database (it needs persistent storage): "
            "set storage_size_gb or at least one volume",
        )

    if not image_set:
        for field in IMAGE_UPDATE_FIELDS:
            if field in data:
                yield (
                    (field,),
                    "NOT_ALLOWED",
                    "must not be set without docker_image: there is no image to update",
                )
    strategy = data.get("image_update_strategy")
    constraint = data.get("image_update_constraint")
    if "image_update_constraint" in data and "image_update_strategy" not in data:
        yield (
            ("image_update_strategy",),
            "REQUIRED",
            f"is required when image_update_constraint is set; one of {', '.join(IMAGE_UPDATE_STRATEGIES)}",
        )
    elif strategy == "digest" and "image_update_constraint" not in data:
        yield (
            ("image_update_constraint",),
            "REQUIRED",
            "is required when image_update_strategy is digest: the tag whose digest to follow",
        )
    elif isinstance(constraint, str) and constraint.strip() == constraint != "":
        if strategy == "semver" and not _semver_constraint_ok(constraint):
            yield (
                ("image_update_constraint",),
                "INVALID_FORMAT",
                "must be a semver constraint such as ^1.2, ~1.2.3, '>=1.0 <2.0' or 1.x when "
                f"image_update_strategy is semver, got {constraint[:80]!r}",
            )
        elif strategy == "digest" and not _TAG.fullmatch(constraint):
            yield (
                ("image_update_constraint",),
                "INVALID_FORMAT",
                f"must be an image tag when image_update_strategy is digest, got {constraint[:80]!r}",
            )
        elif strategy in ("newest-build", "alphabetical"):
            # Image Updater ignores it for these strategies; accepting it would mislead the user.
            yield (
                ("image_update_constraint",),
                "NOT_ALLOWED",
                f"must not be set with image_update_strategy {strategy}; it applies to semver and digest "
                "(use image_allow_tags to filter tags)",
            )

    env = data.get("environment_variables")
    if isinstance(env, list | tuple):
        if len(env) > limits.environment_variables_max:
            yield (
                ("environment_variables",),
                "TOO_LONG",
                f"must have at most {limits.environment_variables_max} entries, got {len(env)}",
            )
        total = sum(len(entry.encode(errors="replace")) for entry in env if isinstance(entry, str))
        if total > limits.environment_total_max_bytes:
            yield (
                ("environment_variables",),
                "TOO_LONG",
                f"must hold at most {limits.environment_total_max_bytes} bytes in all (UTF-8), got {total}",
            )
        first_seen: dict[str, int] = {}
        for index, entry in enumerate(env):
            if not isinstance(entry, str) or "=" not in entry:
                continue
            name = entry.partition("=")[0]
            if name in first_seen:
                yield (
                    ("environment_variables", index),
                    "DUPLICATE",
                    f"sets {name} again (first set at environment_variables[{first_seen[name]}]); names must be unique",
                )
            else:
                first_seen[name] = index

    volumes = data.get("volumes")
    if isinstance(volumes, list | tuple):
        if len(volumes) > limits.volumes_max:
            yield (
                ("volumes",),
                "TOO_LONG",
                f"must have at most {limits.volumes_max} entries, got {len(volumes)}",
            )
        paths: dict[str, int] = {}
        for index, volume in enumerate(volumes):
            path = volume.get("path") if isinstance(volume, Mapping) else None
            if not isinstance(path, str) or path == "":
                continue
            if path in paths:
                yield (
                    ("volumes", index, "path"),
                    "DUPLICATE",
                    f"mounts {path} again (already used by volumes[{paths[path]}]); paths must be unique",
                )
            else:
                paths[path] = index


def _path(loc: Loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def _order(loc: Loc) -> tuple[int, ...]:
    key: list[int] = []
    for depth, part in enumerate(loc):
        if isinstance(part, int):
            key.append(part)
        else:
            order = FIELD_ORDER if depth == 0 else VOLUME_FIELD_ORDER
            key.append(order.index(part) if part in order else len(order))
    return tuple(key)


def _from_pydantic(error: Mapping[str, Any]) -> tuple[Loc, str, str]:
    kind: str = error["type"]
    loc: Loc = tuple(error["loc"])
    if kind.isupper():
        return loc, kind, str(error["msg"])
    if kind in _TYPE_NAMES:
        return loc, "INVALID_TYPE", f"must be {_TYPE_NAMES[kind]}"
    reason = _PYDANTIC_REASONS.get(kind, "INVALID_VALUE")
    if reason == "REQUIRED":
        return loc, reason, "is required"
    if reason == "UNKNOWN_FIELD":
        known = VOLUME_FIELD_ORDER if len(loc) > 1 else FIELD_ORDER
        return loc, reason, f"is not a field of the request; the fields are {', '.join(known)}"
    message: str = error["msg"]
    return loc, reason, f"is invalid: {message[:1].lower()}{message[1:]}"


def _without_unset(data: Mapping[str, Any]) -> dict[str, Any]:
    # A null is how JSON and proto3 optional say "not set", so it means the field's default.
    cleaned = {key: value for key, value in data.items() if value is not None}
    volumes = cleaned.get("volumes")
    if isinstance(volumes, list | tuple):
        cleaned["volumes"] = [
            {k: v for k, v in volume.items() if v is not None} if isinstance(volume, Mapping) else volume
            for volume in volumes
        ]
    return cleaned


def validate_create(data: Mapping[str, Any], *, limits: Limits, regions: Collection[str]) -> DeploymentSpec:
    """Checks a create request; raises SpecInvalid listing every violation, in request field order.

    `data` holds only the fields the caller set; volumes entries are dicts with path, sizeGb, purpose.
    """
    cleaned = _without_unset(data)
    found: list[tuple[Loc, str, str]] = []
    spec: DeploymentSpec | None = None
    try:
        spec = DeploymentSpec.model_validate(cleaned, context={"limits": limits, "regions": regions})
    except ValidationError as exc:
        found.extend(_from_pydantic(error) for error in exc.errors(include_url=False, include_input=False))
    found.extend(_cross_field(cleaned, limits))
    if found or spec is None:
        found.sort(key=lambda item: _order(item[0]))
        raise SpecInvalid([Violation(_path(loc), f"{_path(loc)} {message}", reason) for loc, reason, message in found])
    return spec


async def validate_create_resolving(
    data: Mapping[str, Any],
    *,
    limits: Limits,
    regions: Collection[str],
    resolver: netguard.Resolver | None = None,
) -> DeploymentSpec:
    """validate_create, plus what `helm_repo_url`'s host name resolves to now (it must be a public address).

    A name that does not resolve is let through: DNS may be briefly unavailable, and whatever fetches
    the chart checks the name again at the time of use (`apphosting.netguard.resolve_public`).
    """
    violations: list[Violation] = []
    spec: DeploymentSpec | None = None
    try:
        spec = validate_create(data, limits=limits, regions=regions)
    except SpecInvalid as invalid:
        violations.extend(invalid.violations)
    url = data.get("helm_repo_url")
    if isinstance(url, str) and not any(v.field == "helm_repo_url" for v in violations):
        host = urlsplit(url).hostname
        if host:
            try:
                await netguard.resolve_public(host, allowed=limits.helm_repo_hosts, resolver=resolver)
            except netguard.Refused as refused:
                violations.append(
                    Violation(
                        "helm_repo_url",
                        f"helm_repo_url must name a public host the platform may fetch from; {refused}",
                        "NOT_ALLOWED",
                    )
                )
            except netguard.Unresolvable:
                pass
    if violations or spec is None:
        raise SpecInvalid(_in_field_order(violations))
    return spec


def _in_field_order(violations: Sequence[Violation]) -> list[Violation]:
    def top(violation: Violation) -> int:
        name = re.split(r"[.\[]", violation.field, maxsplit=1)[0]
        return FIELD_ORDER.index(name) if name in FIELD_ORDER else len(FIELD_ORDER)

    # Stable: entries of one field keep the order validate_create gave them.
    return sorted(violations, key=top)
