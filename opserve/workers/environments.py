"""Per-model execution environments: Triton's `EXECUTION_ENV_PATH`, for every backend.

Triton reads the parameter for Python models only; here any model may name one, so that a model
runs on its own framework version (and its op libraries are inspected there). The parameter names a virtual environment folder or a packed one (`.tar.gz`, as `conda-pack`
makes), with `$$TRITON_MODEL_DIRECTORY` standing for the model's folder. A packed environment is
unpacked once into a cache folder keyed by the archive's path, size and modification time. The
model's worker then runs under that environment's interpreter, with its `bin` first on `PATH` and
its `lib` on `LD_LIBRARY_PATH`, as Triton's stub does. The environment must hold what the
model's worker imports: numpy, and its backend's framework (`WORKER_NEEDS`).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tarfile
from pathlib import Path
from typing import Any

from opserve.errors import InvalidArgumentError, UnavailableError
from opserve.workers.launcher import Launcher

MODEL_DIRECTORY_VARIABLE = "$$TRITON_MODEL_DIRECTORY"
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_checked: dict[tuple[str, int, str], str] = {}  # (interpreter, backend) -> problem ("" if fine)

# backend -> the modules its worker imports beside the standard library (PyTorch's and
# TensorFlow's backends read the config as protobuf, through tritonclient's generated modules)
WORKER_NEEDS = {
    "python": ("numpy",),
    "onnxruntime": ("numpy", "onnxruntime"),
    "pytorch": ("numpy", "torch", "tritonclient.grpc"),
    "tensorflow": ("numpy", "tensorflow", "tritonclient.grpc"),
}


def cache_root() -> Path:
    base = os.environ.get("OPSERVE_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME")
    return Path(base) / "opserve" if base else Path.home() / ".cache" / "opserve"


def execution_environment(config: Any, model_dir: Path) -> Path | None:
    """The environment a model's config names (`EXECUTION_ENV_PATH`), or None; the parameter
    on a backend that has no worker (an ensemble) is an error."""
    parameter = config.parameters.get("EXECUTION_ENV_PATH")
    if parameter is None or not parameter.string_value:
        return None
    if config.backend not in WORKER_NEEDS:
        raise InvalidArgumentError(
            f"model '{config.name}': EXECUTION_ENV_PATH names the environment of a model's "
            f"worker; '{config.backend or config.platform}' models have none"
        )
    return environment_path(parameter.string_value, model_dir)


def environment_path(value: str, model_dir: Path) -> Path:
    """The parameter's value with the model's folder put in, made absolute."""
    path = Path(value.replace(MODEL_DIRECTORY_VARIABLE, str(model_dir)))
    return path if path.is_absolute() else model_dir / path


def unpacked(archive: Path) -> Path:
    """The folder an archived environment is unpacked into (once)."""
    stat = archive.stat()
    key = hashlib.sha256(f"{archive.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    target = cache_root() / "environments" / key.hexdigest()[:24]
    if (target / ".complete").exists():
        return target
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    partial.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "tar_filter"):
                tar.extractall(partial, filter="tar")
            else:  # Python without extraction filters
                tar.extractall(partial)  # noqa: S202
    except (OSError, tarfile.TarError) as exc:
        raise UnavailableError(f"cannot unpack execution environment '{archive}': {exc}") from None
    (partial / ".complete").touch()
    try:
        partial.rename(target)
    except OSError:  # another server unpacked it meanwhile
        pass
    return target


def _interpreter(root: Path) -> Path | None:
    for name in ("python3", "python"):
        candidate = root / "bin" / name
        if candidate.exists():
            return candidate
    return None


def resolve_environment(path: Path, base_env: dict[str, str]) -> Launcher:
    """A launcher for the interpreter of the environment at `path` (an archive is unpacked
    once); a clear error when it is missing or has no interpreter."""
    if not path.exists():
        raise UnavailableError(
            f"execution environment '{path}' (EXECUTION_ENV_PATH) does not exist"
        )
    if path.is_file():
        if not path.name.endswith(_ARCHIVE_SUFFIXES):
            raise UnavailableError(
                f"execution environment '{path}' is neither a folder nor a .tar.gz archive"
            )
        root = unpacked(path)
    else:
        root = path
    python = _interpreter(root)
    if python is None:
        raise UnavailableError(f"execution environment '{path}' has no bin/python3 or bin/python")
    env = dict(base_env)
    env["PATH"] = f"{root / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    lib = root / "lib"
    if lib.is_dir():
        previous = env.get("LD_LIBRARY_PATH")
        env["LD_LIBRARY_PATH"] = f"{lib}{os.pathsep}{previous}" if previous else str(lib)
    return Launcher.for_interpreter(python, env)


async def environment_launcher(
    path: Path, base_env: dict[str, str], backend: str = "python"
) -> Launcher:
    """A launcher for a model's worker under its own environment; a clear error when the
    environment is missing, has no interpreter, or lacks what the backend's worker imports."""
    launcher = await asyncio.get_running_loop().run_in_executor(
        None, resolve_environment, path, base_env
    )
    problem = await _check(launcher, backend)
    if problem:
        raise UnavailableError(f"execution environment '{path}': {problem}")
    return launcher


async def _check(launcher: Launcher, backend: str) -> str:
    """Whether the interpreter runs and has what the backend's worker needs, once per binary."""
    needs = WORKER_NEEDS.get(backend, WORKER_NEEDS["python"])
    key = (launcher.executable, Path(launcher.executable).stat().st_mtime_ns, backend)
    if key not in _checked:
        code = (
            "import importlib.util as u, sys; assert sys.version_info >= (3, 10), 'Python 3.10+'; "
            f"missing = [m for m in {list(needs)!r} if u.find_spec(m.split('.')[0]) is None]; "
            "print(' '.join(missing))"
        )
        process = await asyncio.create_subprocess_exec(
            launcher.executable,
            "-c",
            code,
            env=launcher.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await process.communicate()
        lines = stderr.decode(errors="replace").strip().splitlines()
        missing = stdout.decode(errors="replace").split()
        if process.returncode != 0:
            problem = (
                f"its interpreter {launcher.executable} cannot run the worker (it needs Python "
                f"3.10+): {lines[-1] if lines else process.returncode}"
            )
        elif missing:
            packages = " ".join(
                "tritonclient[grpc]" if m == "tritonclient.grpc" else m for m in missing
            )
            problem = (
                f"it lacks {', '.join(missing)}, which the worker of a '{backend}' model imports: "
                f"{launcher.executable} -m pip install {packages}"
            )
        else:
            problem = ""
        _checked[key] = problem
    return _checked[key]
