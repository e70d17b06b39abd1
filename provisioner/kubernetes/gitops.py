"""The GitOps repository: commits a deployment's files under its path and removes them, with the git CLI."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Mapping
from pathlib import Path

from provisioner.driver import PermanentError, TemporaryError

# A push that lost a race with another worker is redone on the new head this many times.
_PUSH_ATTEMPTS = 5
_GIT_TIMEOUT = 60.0
_AUTHOR = ("-c", "user.name=apphosting", "-c", "user.email=provisioner@apphosting.invalid")


class GitOpsRepo:
    """One remote repository and a private working clone of it.

    Every change fetches, resets the clone to the remote branch, applies itself and pushes, so the
    remote stays the only truth: several workers (or processes) can share the repository, and a
    rejected push is simply redone on the new head. Calls block; run them in a thread. One lock
    serialises them, because they share the clone.
    """

    def __init__(self, url: str, branch: str = "main", *, token_file: str | None = None) -> None:
        self.url = url
        self.branch = branch
        self._token_file = token_file
        self._lock = threading.Lock()
        self._clone: Path | None = None
        self._tmp = tempfile.mkdtemp(prefix="apphosting-gitops-")
        weakref.finalize(self, shutil.rmtree, self._tmp, True)

    @classmethod
    def local(cls, directory: str | Path, branch: str = "main") -> GitOpsRepo:
        """A bare repository in `directory`, created (with an empty first commit) when missing."""
        path = Path(directory).resolve()
        if not (path / "HEAD").exists():
            path.mkdir(parents=True, exist_ok=True)
            _git(None, "init", "--bare", "--quiet", f"--initial-branch={branch}", str(path))
        return cls(str(path), branch)

    def _auth(self) -> Mapping[str, str]:
        """The environment that gives one git command the token; empty without a token."""
        if self._token_file is None:
            return {}
        # A header for this one command, never in the clone's config or the URL, and passed through
        # the environment (git's GIT_CONFIG_COUNT/KEY/VALUE), not `-c` on the command line, which
        # every local user can read in /proc/<pid>/cmdline.
        token = Path(self._token_file).read_text().strip()
        basic = base64.b64encode(f"x-access-token:{token}".encode()).decode()
        index = int(os.environ.get("GIT_CONFIG_COUNT", "0") or 0)
        return {
            "GIT_CONFIG_COUNT": str(index + 1),
            f"GIT_CONFIG_KEY_{index}": "http.extraHeader",
            f"GIT_CONFIG_VALUE_{index}": f"Authorization: Basic {basic}",
        }

    def _ensure_clone(self) -> Path:
        if self._clone is not None:
            return self._clone
        clone = Path(self._tmp) / "clone"
        _git(None, "clone", "--quiet", "--no-checkout", self.url, str(clone), env=self._auth())
        self._clone = clone
        return clone

    def _sync(self, clone: Path) -> bool:
        """Resets the clone to the remote branch; False when the branch does not exist yet."""
        _git(clone, "fetch", "--quiet", "--prune", "origin", env=self._auth())
        has_branch = (
            _run_git(clone, ("rev-parse", "--verify", "--quiet", f"refs/remotes/origin/{self.branch}")).returncode == 0
        )
        if has_branch:
            _git(clone, "checkout", "--quiet", "-B", self.branch, f"origin/{self.branch}")
            _git(clone, "reset", "--quiet", "--hard", f"origin/{self.branch}")
        else:
            _git(clone, "checkout", "--quiet", "--orphan", self.branch)
            _git(clone, "rm", "-r", "--quiet", "--cached", "--ignore-unmatch", ".")
        _git(clone, "clean", "-fdq")
        return has_branch

    def _commit_and_push(self, clone: Path, message: str) -> str | None:
        """Commits the staged change and pushes it; None when the push lost a race."""
        _git(clone, *_AUTHOR, "commit", "--quiet", "--allow-empty-message", "-m", message)
        pushed = _run_git(clone, ("push", "--quiet", "--porcelain", "origin", self.branch), self._auth())
        if pushed.returncode != 0:
            if "rejected" in pushed.stdout or "fetch first" in pushed.stderr or "non-fast-forward" in pushed.stderr:
                return None
            raise TemporaryError(f"git push to {self.url} failed: {pushed.stderr.strip() or pushed.stdout.strip()}")
        return _git(clone, "rev-parse", "HEAD").strip()

    def write(self, path: str, files: Mapping[str, str], message: str) -> str:
        """Makes `path` hold exactly `files`; returns the commit that has them (no new commit if unchanged)."""
        _check_path(path)
        with self._lock:
            clone = self._ensure_clone()
            for _ in range(_PUSH_ATTEMPTS):
                self._sync(clone)
                target = clone / path
                if target.exists():
                    shutil.rmtree(target)
                target.mkdir(parents=True)
                for name, text in files.items():
                    _check_path(name)
                    (target / name).write_text(text)
                _git(clone, "add", "--all", "--", path)
                if not _git(clone, "status", "--porcelain", "--", path).strip():
                    return _git(clone, "rev-parse", "HEAD").strip()
                commit = self._commit_and_push(clone, message)
                if commit is not None:
                    return commit
            raise TemporaryError(f"git push to {self.url} kept losing races with other writers")

    def remove(self, path: str, message: str) -> bool:
        """Removes `path`; True when a commit removed it, False when it was not there."""
        _check_path(path)
        with self._lock:
            clone = self._ensure_clone()
            for _ in range(_PUSH_ATTEMPTS):
                if not self._sync(clone) or not (clone / path).exists():
                    return False
                _git(clone, "rm", "-r", "--quiet", "--", path)
                if self._commit_and_push(clone, message) is not None:
                    return True
            raise TemporaryError(f"git push to {self.url} kept losing races with other writers")

    def read(self, path: str) -> dict[str, str] | None:
        """The files under `path` on the remote branch, or None when the path is absent."""
        _check_path(path)
        with self._lock:
            clone = self._ensure_clone()
            if not self._sync(clone) or not (clone / path).is_dir():
                return None
            root = clone / path
            return {str(f.relative_to(root)): f.read_text() for f in sorted(root.rglob("*")) if f.is_file()}

    def snapshot(self, path: str) -> tuple[str | None, dict[str, str] | None]:
        """The remote branch's head commit and the files under `path` there, read together."""
        _check_path(path)
        with self._lock:
            clone = self._ensure_clone()
            if not self._sync(clone):
                return None, None
            head = _git(clone, "rev-parse", "HEAD").strip()
            root = clone / path
            if not root.is_dir():
                return head, None
            return head, {str(f.relative_to(root)): f.read_text() for f in sorted(root.rglob("*")) if f.is_file()}

    def last_change(self, path: str) -> str | None:
        """The newest commit on the remote branch that changed `path`; None when none did."""
        _check_path(path)
        with self._lock:
            clone = self._ensure_clone()
            if not self._sync(clone):
                return None
            return _git(clone, "log", "-1", "--format=%H", "--", path).strip() or None

    def contains(self, commit: str, revision: str) -> bool:
        """True when `revision` is `commit` or a later commit built on it (so it holds that change)."""
        if not _is_sha(commit) or not _is_sha(revision):
            return False
        if commit == revision:
            return True
        with self._lock:
            clone = self._ensure_clone()
            self._sync(clone)
            known = _run_git(clone, ("cat-file", "-e", f"{revision}^{{commit}}")).returncode == 0
            if not known:
                return False
            return _run_git(clone, ("merge-base", "--is-ancestor", commit, revision)).returncode == 0


def _is_sha(text: str) -> bool:
    return len(text) == 40 and all(c in "0123456789abcdef" for c in text)


def _check_path(path: str) -> None:
    parts = Path(path).parts
    if not parts or Path(path).is_absolute() or ".." in parts or parts[0] == ".git":
        raise PermanentError(f"refusing git path {path!r}")


def _git(cwd: Path | None, *args: str, env: Mapping[str, str] | None = None) -> str:
    """Runs git and returns its output; a failure is temporary (the remote may be back soon)."""
    done = _run_git(cwd, args, env)
    if done.returncode != 0:
        raise TemporaryError(f"git {_verb(args)} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def _verb(args: tuple[str, ...]) -> str:
    # Skips `-c key=value` options.
    rest = list(args)
    while rest and rest[0] == "-c":
        rest = rest[2:]
    return rest[0] if rest else "git"


def _run_git(
    cwd: Path | None, args: tuple[str, ...], env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    # No prompts: a missing credential must fail the call, not hang a worker.
    environment = {**os.environ, **(env or {}), "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true", "LC_ALL": "C"}
    try:
        return subprocess.run(
            ["git", *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=_GIT_TIMEOUT, check=False
        )
    except FileNotFoundError as exc:
        raise PermanentError("the git command is not installed on this provisioner") from exc
    except subprocess.TimeoutExpired as exc:
        raise TemporaryError(f"git {_verb(args)} took longer than {_GIT_TIMEOUT:g} s") from exc
