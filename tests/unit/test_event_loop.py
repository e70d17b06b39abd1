"""Every server process runs its main coroutine on uvloop where uvloop is installed, with what it loaded frozen."""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import signal

import pytest

from apphosting_cli.main import _run, _run_loop


@pytest.mark.skipif(importlib.util.find_spec("uvloop") is None, reason="uvloop is not built for this platform")
def test_server_processes_run_on_uvloop() -> None:
    async def main() -> str | None:
        return type(asyncio.get_running_loop()).__module__

    assert _run_loop(main()) == "uvloop"


def test_server_processes_freeze_what_they_loaded_before_they_serve() -> None:
    frozen: list[int] = []

    async def main(stop: asyncio.Event) -> None:
        frozen.append(gc.get_freeze_count())

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    gc.unfreeze()
    try:
        assert _run("test", main) == 0
    finally:
        gc.unfreeze()
        # The loop's signal handlers outlive it; this process keeps its own.
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    # The modules and classes loaded so far, which a full collection would otherwise walk every time.
    (count,) = frozen
    assert count > 10_000
