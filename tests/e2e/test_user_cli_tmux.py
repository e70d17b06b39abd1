"""`apphosting deploy --wait` in a real terminal (tmux): the live progress display, then the final status."""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import sys
import uuid
from pathlib import Path

import pytest

from tests.support.stack import Stack

REPO = Path(__file__).resolve().parents[2]
TMUX = shutil.which("tmux")


async def _tmux(socket: str, *args: str) -> str:
    assert TMUX is not None
    process = await asyncio.create_subprocess_exec(
        TMUX, "-L", socket, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode()


@pytest.mark.skipif(TMUX is None, reason="tmux is not installed (apt-get install -y tmux)")
@pytest.mark.timeout(300)
async def test_deploy_wait_shows_live_progress_in_a_terminal(stack: Stack) -> None:
    await stack.add_api()
    stack.add_scheduler()
    # Slow steps, so the spinner is on screen long enough to be seen.
    stack.add_provisioner(simulate_delay=0.7)
    socket = f"apphosting-test-{uuid.uuid4().hex[:8]}"
    command = " ".join(
        shlex.quote(part)
        for part in (
            sys.executable,
            "-m",
            "apphosting_cli",
            "deploy",
            "--name",
            "tty-web",
            "--region",
            "eu",
            "--app-type",
            "web_app",
            "--image",
            "ghcr.io/acme/web:1.0.0",
            "--cpu",
            "0.5",
            "--memory-mb",
            "512",
            "--wait",
        )
    )
    script = f"cd {shlex.quote(str(REPO))} && {command}; echo EXIT=$?; sleep 600"
    env = f"APPHOSTING_ADDR=127.0.0.1:{stack.apis[0].port}"
    await _tmux(socket, "-f", os.devnull, "new-session", "-d", "-x", "160", "-y", "50", "env", env, "sh", "-c", script)
    try:
        saw_spinner = False
        screen = ""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 240
        while "EXIT=" not in screen:
            assert loop.time() < deadline, screen
            screen = await _tmux(socket, "capture-pane", "-p", "-t", "0")
            # The live line: the name, its status and step after a spinner, while the steps scroll above.
            saw_spinner = saw_spinner or any(
                "tty-web" in line and " · " in line and "EXIT=" not in screen for line in screen.splitlines()
            )
            await asyncio.sleep(0.1)
        assert saw_spinner, screen
        lines = [line for line in screen.splitlines() if line.strip()]
        assert "EXIT=0" in lines[-1], screen
        assert lines[-2].startswith("tty-web: running"), screen
        assert any("provisioning" in line for line in lines), screen
        # The spinner is gone once it ended.
        assert not any(" · " in line for line in lines), screen
    finally:
        await _tmux(socket, "kill-server")
