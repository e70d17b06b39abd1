"""The processes under test: started as real subprocesses with logs in a temp dir, measured through /proc."""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from apphosting.nats_server import NatsServer

_REPO = Path(__file__).resolve().parent.parent


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra or {})
    # The children import `bench` (the echo server) and the product from this checkout.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO), env.get("PYTHONPATH", "")) if p)
    return env


def proc_status_kb(pid: int, key: str) -> int | None:
    """A field of /proc/<pid>/status in KiB (VmRSS now, VmHWM the peak); None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


_TICKS = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time a process has used so far (/proc/<pid>/stat); None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # After the command's closing parenthesis: state, then utime and stime are the 12th and 13th fields.
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_ms_each(before: dict[str, float], after: dict[str, float], count: int) -> dict[str, float]:
    """CPU milliseconds per item of work between two `Stack.cpu_seconds()` readings, by process; numbered
    processes of one kind (provisioner-0, provisioner-1, ...) summed as one, and the sum of all as `total`."""
    spent: dict[str, float] = {}
    for name, seconds in after.items():
        if name in before:
            kind = re.sub(r"-\d+$", "s", name)
            spent[kind] = spent.get(kind, 0.0) + seconds - before[name]
    spent["total"] = sum(spent.values())
    return {kind: round(seconds * 1000 / count, 2) for kind, seconds in spent.items()} if count else {}


def self_peak_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


class Proc:
    """A child process whose stdout and stderr go to files; `ready` waits for a line it prints."""

    def __init__(self, name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.stdout_path = workdir / f"{name}.out"
        self.stderr_path = workdir / f"{name}.err"
        self._out: IO[bytes] = self.stdout_path.open("wb")
        self._err: IO[bytes] = self.stderr_path.open("wb")
        self.process = subprocess.Popen(argv, stdout=self._out, stderr=self._err, env=_env(env), cwd=workdir)
        self.peak_rss_mb: float | None = None
        self._profiler: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_for_line(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            for line in self.stdout_path.read_text(errors="replace").splitlines():
                match = regex.search(line)
                if match:
                    return match
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(
            f"{self.name} did not print /{pattern}/ (exit {self.process.poll()}); "
            f"stderr tail: {self.stderr_path.read_text(errors='replace')[-2000:]}"
        )

    def rss_mb(self) -> float | None:
        kb = proc_status_kb(self.pid, "VmRSS")
        return None if kb is None else round(kb / 1024.0, 1)

    def sample_peak(self) -> float | None:
        """Reads the kernel's high-water mark of resident memory; kept after the process is gone."""
        kb = proc_status_kb(self.pid, "VmHWM")
        if kb is not None:
            self.peak_rss_mb = round(kb / 1024.0, 1)
        return self.peak_rss_mb

    def profile(self, output: Path, rate: int = 100) -> None:
        """Attaches py-spy (collapsed stacks, idle frames dropped) until the process ends."""
        self._profiler = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "py-spy"),
                "record",
                "--pid",
                str(self.pid),
                "--rate",
                str(rate),
                "--format",
                "raw",
                "--nonblocking",
                "--output",
                str(output),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self, timeout: float = 15.0) -> None:
        self.sample_peak()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._profiler is not None:
            try:
                self._profiler.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._profiler.kill()
                self._profiler.wait()
        self._out.close()
        self._err.close()


def python(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


class Stack:
    """A nats-server and the processes of one scenario, in one temp folder; stop() ends them all."""

    def __init__(
        self, workdir: Path, profile_dir: Path | None = None, label: str = "", database_url: str | None = None
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.profile_dir = profile_dir
        self.label = label
        self.nats = NatsServer(workdir / "nats")
        self.nats.start()
        self.procs: list[Proc] = []
        # SQLite in the scenario's folder unless a database (a fresh PostgreSQL one) is given.
        self.database_url = database_url or f"sqlite+aiosqlite:///{workdir / 'apphosting.db'}"

    def start(self, name: str, argv: list[str], *, profile: bool = False, env: dict[str, str] | None = None) -> Proc:
        proc = Proc(name, argv, self.workdir, env)
        self.procs.append(proc)
        if profile and self.profile_dir is not None:
            self.profile_dir.mkdir(parents=True, exist_ok=True)
            proc.profile(self.profile_dir / f"{self.label}-{name}.txt")
        return proc

    def api(
        self,
        locations: Path | None = None,
        *,
        profile: bool = True,
        name: str = "api",
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> tuple[Proc, int]:
        argv = python(
            "apphosting_cli",
            "api",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            self.database_url,
            "--nats-url",
            self.nats.url,
            "--log-level",
            "WARNING",
            # The benchmark measures the pipeline, not token checks or quota locks.
            "--insecure-no-auth",
            "--no-quotas",
        )
        if locations is not None:
            argv += ["--locations", str(locations)]
        argv += extra_args
        proc = self.start(name, argv, env=env)
        port = int(proc.wait_for_line(r"api: gRPC DeploymentService on [\d.]+:(\d+)").group(1))
        if profile and self.profile_dir is not None:
            self.profile_dir.mkdir(parents=True, exist_ok=True)
            proc.profile(self.profile_dir / f"{self.label}-{name}.txt")
        return proc, port

    def peaks(self) -> dict[str, float | None]:
        """Peak resident memory (MiB) of every process of the stack, nats-server included."""
        found: dict[str, float | None] = {}
        for proc in self.procs:
            found[proc.name] = proc.sample_peak()
        if self.nats.process is not None:
            kb = proc_status_kb(self.nats.process.pid, "VmHWM")
            found["nats-server"] = None if kb is None else round(kb / 1024.0, 1)
        return found

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time used so far by every running process of the stack, nats-server and this client included."""
        found = {"bench client": self_cpu_seconds()}
        pids = [(proc.name, proc.pid) for proc in self.procs]
        if self.nats.process is not None:
            pids.append(("nats-server", self.nats.process.pid))
        for name, pid in pids:
            if (seconds := proc_cpu_seconds(pid)) is not None:
                found[name] = seconds
        return found

    def stop(self) -> dict[str, float | None]:
        peaks = self.peaks()
        for proc in reversed(self.procs):
            proc.stop()
        self.nats.stop()
        return peaks
