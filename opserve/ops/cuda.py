"""CUDA's toolkit, for op libraries with `.cu` sources: where nvcc, the headers and the runtime
library are, which CUDA release they are, and which GPU architectures to compile for.

nvcc is looked for, in order, at `$NVCC`, `$CUDA_HOME/bin`, `$CUDA_PATH/bin`, on `PATH`, in a
folder the framework names (PyTorch's `CUDA_HOME`), in NVIDIA's Python wheels
(`site-packages/nvidia/*/bin`) and at `/usr/local/cuda/bin`. nvcc itself says where its
headers and libraries are (`nvcc -v --dryrun`), which also sees through wrapper scripts.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import site
import subprocess
import sysconfig
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from opserve.errors import BuildError

CUDA_SUFFIXES = (".cu",)
SYSTEM_TOOLKIT = Path("/usr/local/cuda")
# the variable that chooses GPU architectures (CMake's own): "80;90", "native", "all-major"
ARCHITECTURES_VARIABLE = "CUDAARCHS"
_LIBRARY_DIRS = ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib")


@dataclass(frozen=True)
class CudaToolkit:
    nvcc: Path
    home: Path
    include: Path
    library_dir: Path  # holds libcudart.so
    cudart: str  # the file to link: libcudart.so, or a versioned name where only that exists
    version: str  # the release nvcc reports, e.g. "13.0"

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    def link_flags(self) -> list[str]:
        """Link the runtime dynamically (as PyTorch's own extensions do) and find it at run time
        without LD_LIBRARY_PATH; a process that already loaded it reuses that copy."""
        return [f"-L{self.library_dir}", f"-l:{self.cudart}", f"-Wl,-rpath,{self.library_dir}"]


def has_cuda_sources(sources: Iterable[Path]) -> bool:
    return any(s.suffix in CUDA_SUFFIXES for s in sources)


def _wheel_compilers(site_dirs: Iterable[str]) -> list[Path]:
    """nvcc in NVIDIA's wheels (nvidia-cuda-nvcc, cuda-toolkit): site-packages/nvidia/*/bin."""
    return [p for d in site_dirs for p in sorted(Path(d).glob("nvidia/*/bin/nvcc"))]


def _default_site_dirs() -> list[str]:
    dirs = [sysconfig.get_paths()["purelib"], *site.getsitepackages()]
    return list(dict.fromkeys(dirs))


def find_nvcc(
    environ: Mapping[str, str] | None = None,
    hint: str | None = None,
    site_dirs: Iterable[str] | None = None,
) -> Path:
    """nvcc, looked for where the module docstring says; a BuildError saying how to get one."""
    env = os.environ if environ is None else environ
    explicit = env.get("NVCC")
    if explicit:
        found = shutil.which(explicit, path=env.get("PATH"))
        if found is None:
            raise BuildError(f"NVCC={explicit} names no CUDA compiler that can be run")
        return Path(found)
    candidates = [Path(env[v]) / "bin" / "nvcc" for v in ("CUDA_HOME", "CUDA_PATH") if env.get(v)]
    on_path = shutil.which("nvcc", path=env.get("PATH", ""))
    if on_path:
        candidates.append(Path(on_path))
    if hint:
        candidates.append(Path(hint) / "bin" / "nvcc")
    candidates += _wheel_compilers(_default_site_dirs() if site_dirs is None else site_dirs)
    candidates.append(SYSTEM_TOOLKIT / "bin" / "nvcc")
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise BuildError(
        "CUDA sources need CUDA's compiler nvcc, which was not found (looked at $NVCC, "
        f"$CUDA_HOME/bin, $CUDA_PATH/bin, PATH, the framework's CUDA_HOME, NVIDIA's wheels and "
        f"{SYSTEM_TOOLKIT}/bin): install the CUDA toolkit (NVIDIA's cuda-toolkit packages, or "
        "`pip install nvidia-cuda-nvcc nvidia-cuda-runtime` into the model's environment) or "
        "name its folder with CUDA_HOME"
    )


@functools.cache
def _nvcc_version(nvcc: Path) -> str:
    try:
        result = subprocess.run(
            [str(nvcc), "--version"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"the CUDA compiler {nvcc} cannot be run: {exc}") from None
    match = re.search(r"release (\d+\.\d+)", result.stdout)
    if result.returncode != 0 or match is None:
        raise BuildError(f"the CUDA compiler {nvcc} did not say its release: {result.stdout!r}")
    return match.group(1)


@functools.cache
def _nvcc_folders(nvcc: Path) -> tuple[Path, list[Path], list[Path]]:
    """nvcc's own folder and the include and library folders it compiles and links with."""
    try:
        result = subprocess.run(
            [str(nvcc), "-v", "--dryrun", "-x", "cu", "-c", "opserve-probe.cu", "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"the CUDA compiler {nvcc} cannot be run: {exc}") from None
    here, includes, libraries = nvcc.parent, [], []
    for line in (result.stdout + result.stderr).splitlines():
        key, _, value = line.removeprefix("#$ ").partition("=")
        if key == "_HERE_" and value.strip():
            here = Path(value.strip())
        elif key == "INCLUDES":
            includes = [Path(p) for p in re.findall(r'-I"?([^"\s]+)', value)]
        elif key == "LIBRARIES":
            found = [Path(p) for p in re.findall(r'-L"?([^"\s]+)', value)]
            libraries = [p for p in found if p.name != "stubs"]
    home = here.parent
    includes = [p.resolve() for p in includes or [home / "include"]]
    libraries = [p.resolve() for p in libraries + [home / d for d in _LIBRARY_DIRS]]
    return here, includes, libraries


def _runtime_library(folders: list[Path]) -> tuple[Path, str] | None:
    for folder in folders:
        if (folder / "libcudart.so").exists():
            return folder, "libcudart.so"
        versioned = sorted(folder.glob("libcudart.so.*"))
        if versioned:
            return folder, versioned[0].name
    return None


def find_toolkit(
    environ: Mapping[str, str] | None = None,
    hint: str | None = None,
    site_dirs: Iterable[str] | None = None,
) -> CudaToolkit:
    """nvcc with its headers and runtime library, all from one toolkit."""
    nvcc = find_nvcc(environ, hint, site_dirs).resolve()
    here, includes, libraries = _nvcc_folders(nvcc)
    include = next((i for i in includes if (i / "cuda_runtime.h").is_file()), None)
    if include is None:
        raise BuildError(
            f"CUDA's headers (cuda_runtime.h) are not where {nvcc} looks: "
            + ", ".join(map(str, includes))
        )
    runtime = _runtime_library(libraries)
    if runtime is None:
        raise BuildError(
            f"CUDA's runtime library (libcudart.so) is not where {nvcc} links from: "
            + ", ".join(map(str, dict.fromkeys(libraries)))
        )
    return CudaToolkit(nvcc, here.parent, include, runtime[0], runtime[1], _nvcc_version(nvcc))


def architecture_flags(environ: Mapping[str, str] | None = None) -> list[str]:
    """nvcc's target flags from $CUDAARCHS ("80;90": machine code for each, and PTX for the
    newest so that later GPUs can compile it; "native", "all", "all-major" as nvcc has them).
    Unset: nvcc's own default, whose PTX later GPUs compile when they load the library."""
    value = (os.environ if environ is None else environ).get(ARCHITECTURES_VARIABLE, "").strip()
    if not value:
        return []
    if value in ("native", "all", "all-major"):
        return [f"-arch={value}"]
    numbers = [a.strip().removeprefix("sm_") for a in re.split(r"[;, ]+", value) if a.strip()]
    if not all(n.rstrip("af").isdigit() for n in numbers):
        raise BuildError(
            f"{ARCHITECTURES_VARIABLE}={value} is not a list of GPU architectures like '80;90' "
            "(or native, all, all-major)"
        )
    flags = [f"-gencode=arch=compute_{n},code=sm_{n}" for n in numbers]
    newest = max(numbers, key=lambda n: int(n.rstrip("af")))
    return [*flags, f"-gencode=arch=compute_{newest},code=compute_{newest}"]
