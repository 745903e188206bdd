"""Child processes of a run: the fake upstream and the gateway, with CPU and RSS probes."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_nofile(want: int | None = None) -> int:
    """Raise this process's RLIMIT_NOFILE soft limit (to the hard limit by default)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if want is None or hard == resource.RLIM_INFINITY else min(want, hard)
    if want is not None and hard == resource.RLIM_INFINITY:
        target = want
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _preexec_nofile() -> None:
    # runs in the child between fork and exec: sockets are file descriptors
    raise_nofile()


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{url} exited with {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status < 500:
                    return
        except OSError as exc:
            if getattr(exc, "code", None) is not None and exc.code < 500:  # type: ignore[attr-defined]
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


class Child:
    """A child process with its log file, stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], logdir: Path) -> None:
        self.name = name
        self.log = logdir / f"{name}.log"
        self._logf = self.log.open("wb")
        self.proc = subprocess.Popen(
            argv,
            env=dict(env),
            cwd=REPO,
            stdout=self._logf,
            stderr=subprocess.STDOUT,
            preexec_fn=_preexec_nofile,
        )
        self.ps = psutil.Process(self.proc.pid)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tree(self) -> list[psutil.Process]:
        """The process and its descendants (the workers of `--workers N`)."""
        try:
            return [self.ps, *self.ps.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the whole tree so far."""
        total = 0.0
        for p in self.tree():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def rss(self) -> int:
        """Resident set size of the whole tree, bytes."""
        total = 0
        for p in self.tree():
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def serving_pids(self) -> list[int]:
        """The pids that serve requests: the workers when forked, else the process itself."""
        kids = [p for p in self.tree()[1:] if "resource_tracker" not in " ".join(_cmd(p))]
        return [p.pid for p in kids] or [self.pid]

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                for p in self.tree()[::-1]:
                    try:
                        p.kill()
                    except psutil.NoSuchProcess:
                        pass
                self.proc.wait(5)
        self._logf.close()


def _cmd(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def base_env() -> dict[str, str]:
    """The environment for children: ours, with the repository importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    for k in [k for k in env if k.startswith("OMNIGATE_")]:
        del env[k]
    return env


def start_fake(port: int, delay_ms: float, chunks: int, logdir: Path) -> Child:
    """`python -m gateway.fake_upstream` on `port`."""
    argv = [
        sys.executable, "-m", "gateway.fake_upstream", "--host", "127.0.0.1",
        "--port", str(port), "--delay-ms", str(delay_ms), "--chunks", str(chunks),
    ]  # fmt: skip
    child = Child("fake_upstream", argv, base_env(), logdir)
    try:
        _wait_for_port(port, child, 20)
    except Exception:
        child.stop()
        raise
    return child


def _wait_for_port(port: int, child: Child, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise RuntimeError(f"{child.name} exited:\n{child.log.read_text(errors='replace')}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{child.name} did not listen on {port}")


def omnigate_argv() -> list[str]:
    """`omnigate` when installed next to this Python, else `python -m gateway.cli`."""
    script = Path(sys.executable).parent / "omnigate"
    if script.exists():
        return [str(script)]
    found = shutil.which("omnigate")
    return [found] if found else [sys.executable, "-m", "gateway.cli"]


def start_gateway(
    port: int, workers: int, env: Mapping[str, str], logdir: Path, name: str = "gateway"
) -> Child:
    """`omnigate serve --port P [--workers W]`, waited for until /healthz answers."""
    argv = [*omnigate_argv(), "serve", "--host", "127.0.0.1", "--port", str(port)]
    if workers > 1:
        argv += ["--workers", str(workers)]
    child = Child(name, argv, {**base_env(), **env}, logdir)
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", child.proc, 60, child.log)
        if workers > 1:  # every worker must be up, not only the first to bind
            deadline = time.monotonic() + 30
            while len(child.serving_pids()) < workers and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.0)
    except Exception:
        child.stop()
        raise
    return child
