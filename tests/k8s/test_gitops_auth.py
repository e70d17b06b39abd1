"""The GitOps token reaches the git server in a header, and never appears on git's command line."""

from __future__ import annotations

import base64
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from provisioner.driver import TemporaryError
from provisioner.kubernetes.gitops import GitOpsRepo

TOKEN = "ghp_s3cr3t-t0ken-value"
BASIC = base64.b64encode(f"x-access-token:{TOKEN}".encode()).decode()


class _Recorder(BaseHTTPRequestHandler):
    """Answers every request 404, after keeping its Authorization header."""

    seen: list[str | None]

    def do_GET(self) -> None:
        self.seen.append(self.headers.get("Authorization"))
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def git_server() -> Iterator[tuple[str, list[str | None]]]:
    seen: list[str | None] = []
    handler = type("Handler", (_Recorder,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/platform/apps.git", seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def git_argv_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Puts a `git` first on PATH that writes down its arguments (what /proc/<pid>/cmdline shows), then runs git."""
    real = shutil.which("git")
    assert real is not None
    log = tmp_path / "argv.log"
    wrapper = tmp_path / "bin" / "git"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >> "{log}"\nexec "{real}" "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}:{Path(real).parent}")
    return log


def test_the_token_is_sent_as_a_header_and_is_not_on_the_command_line(
    tmp_path: Path, git_server: tuple[str, list[str | None]], git_argv_log: Path
) -> None:
    url, seen = git_server
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    repo = GitOpsRepo(url, token_file=str(token_file))

    with pytest.raises(TemporaryError) as failed:
        repo.read("apps/shop")

    assert f"Basic {BASIC}" in seen, seen
    argv = git_argv_log.read_text()
    assert "clone" in argv
    assert TOKEN not in argv
    assert BASIC not in argv
    assert "extraHeader" not in argv
    assert TOKEN not in str(failed.value)
    assert BASIC not in str(failed.value)
