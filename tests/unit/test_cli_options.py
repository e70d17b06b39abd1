"""The API's command-line flags reach its typed options, and bad values are refused by the parser."""

from __future__ import annotations

import pytest

from apphosting_cli.main import _api_options, build_parser
from services.deployments.app import ApiOptions


def _options(*flags: str) -> ApiOptions:
    return _api_options(build_parser().parse_args(["api", "--insecure-no-auth", *flags]))


def test_defaults_are_the_options_defaults() -> None:
    options = _options()
    assert (options.stuck_after, options.resync_interval, options.max_redrives) == (
        ApiOptions.stuck_after,
        ApiOptions.resync_interval,
        ApiOptions.max_redrives,
    )
    assert options.quotas.stored_mb == 256
    assert options.deleted_retention == ApiOptions.deleted_retention


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
