"""Every server process runs its main coroutine on uvloop where uvloop is installed."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

from apphosting_cli.main import _run_loop


@pytest.mark.skipif(importlib.util.find_spec("uvloop") is None, reason="uvloop is not built for this platform")
def test_server_processes_run_on_uvloop() -> None:
    async def main() -> str | None:
        return type(asyncio.get_running_loop()).__module__

    assert _run_loop(main()) == "uvloop"
