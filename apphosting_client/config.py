"""Where the API is and how to reach it: from arguments, the environment (APPHOSTING_*) or a file."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

DEFAULT_ADDRESS = "127.0.0.1:50051"
# The file read when APPHOSTING_CONFIG names none; a missing default file is no error.
DEFAULT_CONFIG_FILE = Path("~/.config/apphosting/config.yaml")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


class ConfigError(ValueError):
    """The configuration file or an APPHOSTING_* variable cannot be understood."""


@dataclass(frozen=True)
class ClientConfig:
    """The API's address (a gRPC target: host:port, or dns:///name:port for several replicas), the
    bearer token (given, or a file read at every call so a rotated token is picked up), and TLS (a CA
    file, or the system's roots; plaintext when off)."""

    address: str = DEFAULT_ADDRESS
    token: str | None = None
    tls: bool = False
    ca_file: str | None = None
    # Seconds one call may take; watches are not bounded by it.
    timeout: float = 30.0
    token_file: str | None = None

    def current_token(self) -> str | None:
        """The token to send now: the token file's content when there is one (read each time), else token."""
        if self.token_file:
            with open(os.path.expanduser(self.token_file), encoding="utf-8") as handle:
                return handle.read().strip() or None
        return self.token

    @classmethod
    def load(
        cls,
        *,
        address: str | None = None,
        token: str | None = None,
        token_file: str | None = None,
        tls: bool | None = None,
        ca_file: str | None = None,
        timeout: float | None = None,
        config_file: str | os.PathLike[str] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> ClientConfig:
        """Arguments (not None) win over the environment, which wins over the config file
        (config_file, else APPHOSTING_CONFIG, else ~/.config/apphosting/config.yaml), over the defaults.

        The credential is one setting: the most precedent source that gives a token or a token file
        decides it, and within one source a token wins over a token file."""
        env = os.environ if environ is None else environ
        arguments = _present(
            address=address, token=token, token_file=token_file, tls=tls, ca_file=ca_file, timeout=timeout
        )
        sources = [arguments, _from_environment(env), _from_file(config_file, env)]
        values: dict[str, Any] = {}
        for source in reversed(sources):
            if "token" in source or "token_file" in source:
                values.pop("token", None)
                values.pop("token_file", None)
                if "token" in source:
                    values["token"] = source["token"]
                else:
                    values["token_file"] = source["token_file"]
            values.update({key: value for key, value in source.items() if key not in ("token", "token_file")})
        return cls(**values)

    @classmethod
    def from_env(cls, **overrides: object) -> ClientConfig:
        """As load: arguments given (not None) win over APPHOSTING_ADDR, APPHOSTING_TOKEN (or
        APPHOSTING_TOKEN_FILE), APPHOSTING_TLS, APPHOSTING_CA, which win over the config file."""
        known = {field.name for field in fields(cls)} | {"config_file", "environ"}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown client settings: {', '.join(sorted(unknown))}")
        return cls.load(**overrides)  # type: ignore[arg-type]


def _present(**values: object) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def _from_environment(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if env.get("APPHOSTING_ADDR"):
        values["address"] = env["APPHOSTING_ADDR"]
    if env.get("APPHOSTING_TOKEN"):
        values["token"] = env["APPHOSTING_TOKEN"]
    if env.get("APPHOSTING_TOKEN_FILE"):
        values["token_file"] = env["APPHOSTING_TOKEN_FILE"]
    if "APPHOSTING_TLS" in env:
        values["tls"] = _boolean(env["APPHOSTING_TLS"], "APPHOSTING_TLS")
    if env.get("APPHOSTING_CA"):
        values["ca_file"] = env["APPHOSTING_CA"]
    return values


def _from_file(config_file: str | os.PathLike[str] | None, env: Mapping[str, str]) -> dict[str, Any]:
    named = config_file or env.get("APPHOSTING_CONFIG")
    path = Path(named if named else DEFAULT_CONFIG_FILE).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if named:
            raise ConfigError(f"{path}: no such configuration file") from None
        return {}
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not YAML: {error}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    unknown = set(document) - {"address", "token", "token_file", "tls", "ca_file", "timeout"}
    if unknown:
        raise ConfigError(f"{path}: unknown settings {', '.join(sorted(map(str, unknown)))}")
    values: dict[str, Any] = {}
    for key in ("address", "token", "token_file", "ca_file"):
        if document.get(key) is not None:
            if not isinstance(document[key], str):
                raise ConfigError(f"{path}: {key} must be a string")
            values[key] = document[key]
    if document.get("tls") is not None:
        tls = document["tls"]
        values["tls"] = tls if isinstance(tls, bool) else _boolean(str(tls), f"{path}: tls")
    if document.get("timeout") is not None:
        timeout = document["timeout"]
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise ConfigError(f"{path}: timeout must be a positive number of seconds")
        values["timeout"] = float(timeout)
    if "token_file" in values:
        # A relative token file is found beside the configuration file, not in the working directory.
        values["token_file"] = str(path.parent / Path(values["token_file"]).expanduser())
    return values


def _boolean(text: str, where: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"{where}: expected true or false, not {text!r}")
