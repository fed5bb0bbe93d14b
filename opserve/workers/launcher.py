"""How a worker process is started: which interpreter, in which environment.

A worker normally runs under the server's own interpreter. A Python model may name an execution
environment of its own (`EXECUTION_ENV_PATH`, see `environments`); its worker then runs under
that environment's interpreter, which imports opserve's worker code (standard library and numpy
only) from a folder that holds nothing but the `opserve` package.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import opserve

WORKER_MODULE = "opserve.workers.main"


@dataclass(frozen=True)
class Launcher:
    executable: str = sys.executable
    env: dict[str, str] | None = None  # None: the server's environment

    def command(
        self,
        fds: tuple[int, ...],
        ring_capacity: int,
        title: str = "",
        shared: bool = False,
        ring_limit: int = 0,
    ) -> list[str]:
        """The worker's command line; `title` (`<model>:<version>`, or `shared-<backend>`) ends
        it, so that `ps` names what a worker serves; `shared`: it hosts many models' instances.
        The rings' size is `<capacity>[:<limit>]`."""
        command = [self.executable, "-m", WORKER_MODULE, *(str(fd) for fd in fds)]
        command.append(f"{ring_capacity}:{ring_limit}" if ring_limit else str(ring_capacity))
        if title:
            command.append(f"opserve-worker:{title}")
        if shared:
            command.append("--shared")
        return command

    @classmethod
    def for_interpreter(cls, executable: Path, env: dict[str, str]) -> Launcher:
        """A launcher for another interpreter: it finds opserve's package, and nothing else of
        the server's, on its path."""
        env = dict(env)
        for key in ("PYTHONHOME", "PYTHONPATH", "VIRTUAL_ENV"):
            env.pop(key, None)
        env["PYTHONPATH"] = str(_package_only_folder())
        env["PYTHONNOUSERSITE"] = "1"
        return cls(str(executable), env)


_PACKAGE_FOLDER: Path | None = None


def _package_only_folder() -> Path:
    """A folder holding only a link to the `opserve` package (made once per server)."""
    global _PACKAGE_FOLDER
    if _PACKAGE_FOLDER is None or not (_PACKAGE_FOLDER / "opserve").exists():
        folder = Path(tempfile.mkdtemp(prefix="opserve-path-"))
        os.symlink(Path(opserve.__file__).resolve().parent, folder / "opserve")
        _PACKAGE_FOLDER = folder
    return _PACKAGE_FOLDER
