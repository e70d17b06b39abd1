"""The client's configuration: arguments over APPHOSTING_* over the config file over the defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from apphosting_client import DEFAULT_ADDRESS, AsyncClient, Client, ClientConfig, ConfigError


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home of the test's own: the machine's ~/.config/apphosting must not leak in."""
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_defaults_when_nothing_is_set(tmp_path: Path) -> None:
    config = ClientConfig.load(environ={}, config_file=None)
    assert config == ClientConfig()
    assert config.address == DEFAULT_ADDRESS
    assert config.current_token() is None


def test_a_missing_default_file_is_fine_but_a_named_one_is_an_error(tmp_path: Path) -> None:
    assert ClientConfig.load(environ={}) == ClientConfig()
    with pytest.raises(ConfigError, match="no such configuration file"):
        ClientConfig.load(environ={"APPHOSTING_CONFIG": str(tmp_path / "absent.yaml")})


def test_the_default_file_is_read_from_home(tmp_path: Path) -> None:
    (tmp_path / ".config/apphosting").mkdir(parents=True)
    write(tmp_path / ".config/apphosting/config.yaml", "address: api.example:443\ntls: true\n")
    config = ClientConfig.load(environ={})
    assert (config.address, config.tls) == ("api.example:443", True)


def test_every_file_key(tmp_path: Path) -> None:
    file = write(
        tmp_path / "config.yaml",
        "address: file:1\ntoken: file-token\ntls: yes\nca_file: /ca.pem\ntimeout: 7\n",
    )
    config = ClientConfig.load(environ={"APPHOSTING_CONFIG": file})
    assert config == ClientConfig(address="file:1", token="file-token", tls=True, ca_file="/ca.pem", timeout=7.0)


def test_precedence_arguments_over_environment_over_file(tmp_path: Path) -> None:
    file = write(tmp_path / "c.yaml", "address: file:1\ntoken: file-token\ntls: false\ntimeout: 9\nca_file: /f.pem\n")
    environ = {"APPHOSTING_CONFIG": file, "APPHOSTING_ADDR": "env:2", "APPHOSTING_TLS": "true"}
    from_env = ClientConfig.load(environ=environ)
    assert (from_env.address, from_env.tls, from_env.token, from_env.timeout, from_env.ca_file) == (
        "env:2",
        True,
        "file-token",
        9.0,
        "/f.pem",
    )
    from_arguments = ClientConfig.load(address="arg:3", tls=False, timeout=1.5, environ=environ)
    assert (from_arguments.address, from_arguments.tls, from_arguments.timeout) == ("arg:3", False, 1.5)
    # from_env is the same resolution, with the real environment.
    assert ClientConfig.from_env(address="arg:3", environ=environ).address == "arg:3"
    with pytest.raises(TypeError, match="adress"):
        ClientConfig.from_env(adress="typo:1")


def test_the_credential_comes_whole_from_the_most_precedent_source(tmp_path: Path) -> None:
    token_file = write(tmp_path / "token", "from-file\n")
    file = write(tmp_path / "c.yaml", "token: in-config\n")
    # A token file in the environment beats a token in the config file ...
    config = ClientConfig.load(environ={"APPHOSTING_CONFIG": file, "APPHOSTING_TOKEN_FILE": token_file})
    assert config.current_token() == "from-file"
    # ... a token argument beats a token file in the environment ...
    config = ClientConfig.load(token="arg", environ={"APPHOSTING_CONFIG": file, "APPHOSTING_TOKEN_FILE": token_file})
    assert (config.current_token(), config.token_file) == ("arg", None)
    # ... and within one source the token wins over the file.
    config = ClientConfig.load(environ={"APPHOSTING_TOKEN": "env", "APPHOSTING_TOKEN_FILE": token_file})
    assert config.current_token() == "env"


def test_a_token_file_is_read_at_every_call_so_a_rotated_token_is_used(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("first\n")
    config = ClientConfig.load(environ={"APPHOSTING_TOKEN_FILE": str(token_file)})
    assert config.current_token() == "first"
    token_file.write_text("second\n")
    assert config.current_token() == "second"


def test_a_relative_token_file_in_the_config_file_is_beside_it(tmp_path: Path) -> None:
    write(tmp_path / "token", "beside")
    file = write(tmp_path / "c.yaml", "token_file: token\n")
    assert ClientConfig.load(environ={"APPHOSTING_CONFIG": file}).current_token() == "beside"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- a list\n", "mapping"),
        ("adress: x:1\n", "unknown settings adress"),
        ("timeout: -1\n", "timeout"),
        ("timeout: soon\n", "timeout"),
        ("tls: maybe\n", "true or false"),
        ("address: 5\n", "address must be a string"),
        ("address: [\n", "not YAML"),
    ],
)
def test_a_bad_config_file_says_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    file = write(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError, match=message):
        ClientConfig.load(environ={"APPHOSTING_CONFIG": file})


def test_a_bad_tls_variable_is_an_error() -> None:
    with pytest.raises(ConfigError, match="APPHOSTING_TLS"):
        ClientConfig.load(environ={"APPHOSTING_TLS": "perhaps"}, config_file=None)


def test_the_blocking_client_has_every_method_of_the_async_one() -> None:
    methods = {name for name, value in vars(AsyncClient).items() if not name.startswith("_") and callable(value)}
    assert methods <= set(vars(Client))
