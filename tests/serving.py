"""A real `opserve serve` process on a free loopback port, for tests and benchmarks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def children(pid: int) -> set[int]:
    """The processes `pid` started (a server's workers)."""
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def mapped(pid: int, text: str) -> bool:
    """Whether a mapping of process `pid` (a loaded library) has `text` in its path."""
    try:
        return text in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


class RunningServer:
    """`with RunningServer([repo]) as server:` starts opserve, waits until it is live, stops it."""

    def __init__(
        self,
        repositories: list[Path],
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        startup_timeout: float = 120.0,
        cwd: Path | None = None,
        program: list[str] | None = None,
    ) -> None:
        """`program` runs opserve (default: `python -m opserve`); `cwd` is its working directory."""
        self.repositories = repositories
        self.cwd = cwd
        self.program = program or [sys.executable, "-m", "opserve"]
        self.extra_args = extra_args or []
        self.env = env
        self.port = free_port()
        self.grpc_port = free_port()
        self.metrics_port = free_port()
        self.log_path = (
            log_path or Path(os.environ.get("TMPDIR", "/tmp")) / f"opserve-{self.port}.log"
        )
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def __enter__(self) -> RunningServer:
        command = [
            *self.program,
            "serve",
            "--http-address",
            "127.0.0.1",
            "--http-port",
            str(self.port),
            "--grpc-address",
            "127.0.0.1",
            "--grpc-port",
            str(self.grpc_port),
            "--metrics-address",
            "127.0.0.1",
            "--metrics-port",
            str(self.metrics_port),
        ]
        for repository in self.repositories:
            command += ["--model-repository", str(repository)]
        if not any(a.startswith("--exit-on-error") for a in self.extra_args):
            # test repositories hold broken models on purpose: keep serving the others
            command.append("--exit-on-error=false")
        if not any(a.startswith("--startup-wait-secs") for a in self.extra_args):
            # live means every model has finished loading, however slow a loaded machine is
            command.append("--startup-wait-secs=600")
        command += self.extra_args
        env = dict(os.environ)
        env.update(self.env or {})
        self._log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            command, stdout=self._log_file, stderr=subprocess.STDOUT, env=env, cwd=self.cwd
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"opserve exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(
                    f"http://{self.url}/v2/health/live", timeout=1
                ) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        self.__exit__(None, None, None)
        raise RuntimeError(f"opserve did not become live in {self.startup_timeout}s:\n{self.log()}")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()


def eventually(condition: Callable[[], object], what: str, seconds: float = 30.0) -> None:
    """Wait for `condition` (a bound on a wait for a fault to heal, not a timed assertion)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.05)
