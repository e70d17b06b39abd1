"""The API's command-line flags reach its typed options, and bad values are refused by the parser."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from apphosting_cli.main import SERVER_COMMANDS, _api_options, build_parser
from services.deployments.app import ApiOptions
from services.deployments.quotas import Quotas


def _options(*flags: str) -> ApiOptions:
    return _api_options(build_parser().parse_args(["api", "--insecure-no-auth", *flags]))


def test_defaults_are_the_options_defaults() -> None:
    options = _options()
    assert (options.stuck_after, options.resync_interval, options.max_redrives) == (
        ApiOptions.stuck_after,
        ApiOptions.resync_interval,
        ApiOptions.max_redrives,
    )
    assert options.quotas == Quotas()
    assert (options.deleted_retention, options.rollout_timeout) == (
        ApiOptions.deleted_retention,
        ApiOptions.rollout_timeout,
    )


def test_the_worker_processes_parse_their_command_line_without_the_apis_code() -> None:
    """The provisioner and the scheduler share the API's parser; the defaults it shows come from a module
    that imports nothing, so their start-up loads none of the API (its ORM models, Alembic, gRPC server),
    nor the user commands' Typer app."""
    script = (
        "import sys\n"
        "from apphosting_cli.main import _user_command, build_parser\n"
        "for argv in (['provisioner', '--location', 'x'], ['scheduler']):\n"
        "    assert not _user_command(argv)\n"
        "    build_parser().parse_args(argv)\n"
        "watched = ('services.', 'alembic', 'apphosting_cli.user')\n"
        "print(' '.join(sorted(name for name in sys.modules if name.startswith(watched))))\n"
        "print('typer' in sys.modules)\n"
    )
    found = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120)
    loaded, typer_loaded = found.stdout.splitlines()
    assert loaded.split() == ["services.deployments", "services.deployments.defaults"]
    assert typer_loaded == "False"


def test_the_server_commands_are_the_parsers_subcommands() -> None:
    parser = build_parser()
    (commands,) = (action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    assert set(commands.choices) == SERVER_COMMANDS


def test_resync_and_stored_quota_flags_reach_the_options() -> None:
    options = _options(
        "--stuck-after", "90", "--resync-interval", "5", "--max-redrives", "0", "--quota-stored-mb", "unlimited"
    )
    assert (options.stuck_after, options.resync_interval, options.max_redrives) == (90.0, 5.0, 0)
    assert options.quotas.stored_mb is None
    assert _options("--quota-stored-mb", "12").quotas.stored_mb == 12
    assert _options("--deleted-retention", "0").deleted_retention == 0.0


@pytest.mark.parametrize(
    "flags",
    [
        ("--stuck-after", "0"),
        ("--stuck-after", "-1"),
        ("--resync-interval", "0"),
        ("--max-redrives", "-1"),
        ("--max-redrives", "1.5"),
        ("--quota-stored-mb", "-3"),
        ("--deleted-retention", "-1"),
    ],
)
def test_bad_values_are_refused_naming_the_flag(flags: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        _options(*flags)
    assert exited.value.code == 2
    assert flags[0] in capsys.readouterr().err


def test_rest_takes_its_listen_address_and_the_api_it_fronts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPHOSTING_ADDR", "10.0.0.5:50051")
    args = build_parser().parse_args(["rest", "--listen", "127.0.0.1:9090", "--api-tls", "--api-ca", "ca.pem"])
    assert (args.listen, args.api, args.api_tls, args.api_ca) == ("127.0.0.1:9090", "10.0.0.5:50051", True, "ca.pem")
    assert build_parser().parse_args(["rest"]).listen == "127.0.0.1:8080"


def test_dev_runs_the_rest_gateway_unless_told_off() -> None:
    assert build_parser().parse_args(["dev"]).rest_listen == "127.0.0.1:8080"
    assert build_parser().parse_args(["dev", "--rest-listen", "off"]).rest_listen == "off"


def test_user_commands_go_to_the_user_cli_and_server_commands_stay_with_argparse(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from apphosting_cli.main import main

    assert main(["deploy", "--help"]) == 0
    assert "--wait" in capsys.readouterr().out
    assert main(["completion", "bash"]) == 0
    assert "_APPHOSTING_COMPLETE" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["api", "--help"])
    assert "--jwt-secret-file" in capsys.readouterr().out


def test_an_oidc_issuer_beside_a_key_file_makes_a_chain_of_both(tmp_path: Path) -> None:
    from services.deployments.auth import OidcVerifier, VerifierChain

    secret = tmp_path / "secret"
    secret.write_text("s" * 40)
    oidc = ["--oidc-issuer", "https://id.example.com/realms/apps", "--oidc-audience", "apphosting"]
    alone = _api_options(build_parser().parse_args(["api", *oidc, "--oidc-admin-claim", "groups"]))
    assert isinstance(alone.auth, OidcVerifier)
    both = _api_options(build_parser().parse_args(["api", "--jwt-secret-file", str(secret), *oidc]))
    assert isinstance(both.auth, VerifierChain)


@pytest.mark.parametrize(
    "flags",
    [
        ("--oidc-issuer", "https://id.example.com"),
        ("--oidc-issuer", "http://id.example.com", "--oidc-audience", "a"),
        ("--oidc-issuer", "https://id.example.com", "--oidc-audience", "a", "--oidc-algorithms", "HS256"),
        ("--oidc-issuer", "https://id.example.com", "--oidc-audience", "a", "--insecure-no-auth"),
    ],
)
def test_an_oidc_issuer_that_cannot_work_is_refused_at_start(
    flags: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as refused:
        _api_options(build_parser().parse_args(["api", *flags]))
    assert refused.value.code == 2
    assert "oidc" in capsys.readouterr().err.lower()
