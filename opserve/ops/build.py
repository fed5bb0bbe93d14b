"""Building custom-op libraries from C++ sources for the framework that will load them.

The flags come from the interpreter whose framework will load the library (the server's, or a
model's `EXECUTION_ENV_PATH` environment), asked in a child process, never imported here:
PyTorch's include and library folders and its `_GLIBCXX_USE_CXX11_ABI`
(`torch.utils.cpp_extension`), TensorFlow's `tf.sysconfig` compile and link flags, ONNX Runtime's
version (its headers come from `headers`). Builds are cached under `<cache>/oplibs/` by a hash of
the sources, the flags, the framework's version, the compiler and (ONNX Runtime) the headers, so
a framework upgrade builds anew and nothing else does.

CUDA sources (`.cu`) are compiled by nvcc (`opserve.ops.cuda`) with the framework's include
folders and defines, and linked with the C++ sources against CUDA's runtime (for PyTorch also
`libtorch_cuda` and `libc10_cuda`); a PyTorch without CUDA, or one built for another CUDA major
release than nvcc's, is refused before anything is compiled.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opserve.errors import BuildError
from opserve.ops.cuda import CudaToolkit, architecture_flags, find_toolkit, has_cuda_sources
from opserve.ops.headers import api_problem, headers_api_version, onnxruntime_headers
from opserve.workers.launcher import Launcher

FRAMEWORKS = ("onnxruntime", "pytorch", "tensorflow")
_PACKAGES = {"onnxruntime": "onnxruntime", "pytorch": "torch", "tensorflow": "tensorflow"}
# the C++ standard each framework's headers want (TensorFlow's flags name their own)
_DEFAULT_STD = {"onnxruntime": "c++20", "pytorch": "c++20", "tensorflow": None}
_QUERIES = {
    "pytorch": (
        "import json, torch, torch.utils.cpp_extension as c;"
        "print(json.dumps({'version': torch.__version__, 'include': c.include_paths(),"
        " 'lib': c.library_paths(), 'abi': int(torch._C._GLIBCXX_USE_CXX11_ABI),"
        " 'cuda': torch.version.cuda, 'cuda_home': c.CUDA_HOME}))"
    ),
    "tensorflow": (
        "import json, tensorflow as tf;"
        "print(json.dumps({'version': tf.__version__, 'compile': tf.sysconfig.get_compile_flags(),"
        " 'link': tf.sysconfig.get_link_flags()}))"
    ),
    "onnxruntime": (
        "import json, onnxruntime; print(json.dumps({'version': onnxruntime.__version__}))"
    ),
}
BUILD_TIMEOUT_S = 600.0
# what PyTorch's own CUDA extensions compile with (its half-precision types need them)
_TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]


@dataclass
class FrameworkFlags:
    """How to build against one installed framework."""

    framework: str
    version: str
    compile: list[str]
    link: list[str] = field(default_factory=list)
    headers: Path | None = None  # ONNX Runtime's include folder (hashed into the cache key)
    cuda: str | None = None  # the CUDA release the framework was built for (PyTorch)
    cuda_home: str | None = None  # the toolkit the framework would build with (PyTorch)
    cuda_link: list[str] = field(default_factory=list)  # the framework's CUDA libraries


@dataclass
class BuiltLibrary:
    path: Path
    framework: str
    framework_version: str
    cached: bool  # True: an earlier build was reused


def default_cache() -> Path:
    from opserve.workers.environments import cache_root

    return cache_root()


def framework_flags(
    framework: str,
    launcher: Launcher | None = None,
    cache: Path | None = None,
    fetch_headers: bool = False,
) -> FrameworkFlags:
    """Ask the target interpreter's framework for its version and build flags."""
    launcher = launcher or Launcher()
    cache = cache or default_cache()
    facts = _query(framework, launcher.executable, _frozen(launcher.env))
    version = str(facts["version"])
    if framework == "pytorch":
        return FrameworkFlags(
            framework,
            version,
            [f"-I{p}" for p in facts["include"]] + [f"-D_GLIBCXX_USE_CXX11_ABI={facts['abi']}"],
            [*(f"-L{p}" for p in facts["lib"]), "-lc10", "-ltorch_cpu", "-ltorch"],
            cuda=facts.get("cuda"),
            cuda_home=facts.get("cuda_home"),
            cuda_link=["-ltorch_cuda", "-lc10_cuda"],
        )
    if framework == "tensorflow":
        return FrameworkFlags(framework, version, list(facts["compile"]), list(facts["link"]))
    headers = onnxruntime_headers(cache, fetch_headers)
    problem = api_problem(headers_api_version(headers), version, headers)
    if problem:
        raise BuildError(problem)
    return FrameworkFlags(framework, version, [f"-I{headers}"], headers=headers)


def _frozen(env: dict[str, str] | None) -> tuple[tuple[str, str], ...] | None:
    return tuple(sorted(env.items())) if env is not None else None


@functools.lru_cache(maxsize=32)
def _query(framework: str, python: str, env: tuple[tuple[str, str], ...] | None) -> dict[str, Any]:
    environ = dict(env) if env is not None else dict(os.environ)
    environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    try:
        result = subprocess.run(
            [python, "-c", _QUERIES[framework]],
            capture_output=True,
            text=True,
            env=environ,
            timeout=BUILD_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"cannot ask {python} for {framework}'s build flags: {exc}") from None
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        last = lines[-1] if lines else f"exit status {result.returncode}"
        if "ModuleNotFoundError" in last:
            raise BuildError(
                f"{framework} is not installed for {python}, so there is nothing to build "
                f"against: install it there ({python} -m pip install {_PACKAGES[framework]})"
            )
        raise BuildError(f"cannot ask {python} for {framework}'s build flags: {last}")
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def find_compiler() -> str:
    """The C++ compiler: $CXX, else g++ or c++ on PATH; a BuildError saying how to get one."""
    explicit = os.environ.get("CXX")
    if explicit:
        found = shutil.which(explicit)
        if found is None:
            raise BuildError(f"CXX={explicit} names no compiler that can be run")
        return found
    for name in ("g++", "c++"):
        found = shutil.which(name)
        if found is not None:
            return found
    raise BuildError(
        "no C++ compiler found (looked for $CXX, then g++ and c++ on PATH): install one "
        "(Debian and Ubuntu: apt-get install g++; Fedora: dnf install gcc-c++) or name it with CXX"
    )


@functools.cache
def _compiler_identity(compiler: str) -> str:
    try:
        result = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"the C++ compiler {compiler} cannot be run: {exc}") from None
    return f"{compiler} {result.stdout.splitlines()[0] if result.stdout else ''}"


def first_error(output: str) -> str:
    """The compiler's (or linker's) first error line, the one worth showing."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        if re.search(r"\berror\b:|undefined reference", line):
            return line
    return lines[0] if lines else "the compiler said nothing"


def build_library(
    sources: list[Path],
    framework: str,
    launcher: Launcher | None = None,
    *,
    name: str | None = None,
    defines: dict[str, str | None] | None = None,
    std: str | None = None,
    cache: Path | None = None,
    fetch_headers: bool = False,
) -> BuiltLibrary:
    """Compile `sources` into one shared library for `framework` as `launcher`'s interpreter
    has it installed; reused from the cache when nothing that matters changed."""
    if framework not in FRAMEWORKS:
        raise BuildError(f"unknown framework '{framework}': one of {', '.join(FRAMEWORKS)}")
    missing = [str(s) for s in sources if not s.is_file()]
    if missing:
        raise BuildError(f"op sources not found: {', '.join(missing)}")
    if not sources:
        raise BuildError("no op sources to build")
    cache = cache or default_cache()
    compiler = find_compiler()
    flags = framework_flags(framework, launcher, cache, fetch_headers)
    std = std or _DEFAULT_STD[framework]
    compile_flags = ["-shared", "-fPIC", "-O2"]
    if std is not None:
        compile_flags.append(f"-std={std}")
        flags.compile = [f for f in flags.compile if not f.startswith(("-std=", "--std="))]
    compile_flags += flags.compile
    compile_flags += [
        f"-D{key}" if value is None else f"-D{key}={value}"
        for key, value in sorted((defines or {}).items())
    ]
    name = name or f"lib{sources[0].stem}.so"
    digest = hashlib.sha256()
    for source in sources:
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    identity = [framework, flags.version, _compiler_identity(compiler), *compile_flags, *flags.link]
    digest.update("\0".join(identity).encode())
    cuda = _CudaBuild.plan(sources, flags, launcher, compiler, std, compile_flags)
    if cuda is not None:
        compile_flags.append(f"-I{cuda.toolkit.include}")
        digest.update("\0".join(cuda.identity()).encode())
    if flags.headers is not None:
        for header in sorted(flags.headers.glob("*.h")):
            digest.update(header.name.encode() + header.read_bytes())
    folder = cache / "oplibs" / digest.hexdigest()[:16]
    output = folder / name
    if output.is_file():
        return BuiltLibrary(output, framework, flags.version, cached=True)
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f"{name}.partial-{os.getpid()}"
    log = folder / "build.log"
    log.write_text("")
    described = f"{name} from {', '.join(str(s) for s in sources)} for {framework} {flags.version}"
    objects: list[Path] = []
    link = list(flags.link)
    if cuda is not None:
        for index, source in enumerate(s for s in sources if s.suffix == ".cu"):
            target = folder / f"{source.stem}-{index}.cu.o.partial-{os.getpid()}"
            _run([*cuda.compile_command(source, target)], log, described, [partial, *objects])
            objects.append(target)
        link += [*cuda.toolkit.link_flags(), *flags.cuda_link]
    cxx_sources = [str(s) for s in sources if s.suffix != ".cu"]
    command = [compiler, *compile_flags, *cxx_sources, *map(str, objects), "-o", str(partial)]
    _run([*command, *link], log, described, [partial, *objects])
    for obj in objects:
        obj.unlink(missing_ok=True)
    partial.replace(output)
    return BuiltLibrary(output, framework, flags.version, cached=False)


def _run(command: list[str], log: Path, described: str, leftovers: list[Path]) -> None:
    """One compiler or linker step, appended to `log`; a BuildError with its first error."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise BuildError(f"building {described} took longer than {BUILD_TIMEOUT_S:.0f} s") from None
    with log.open("a") as out:
        out.write(" ".join(command) + "\n" + result.stdout + result.stderr)
    if result.returncode != 0:
        for path in leftovers:
            path.unlink(missing_ok=True)
        raise BuildError(
            f"building {described} failed: {first_error(result.stderr + result.stdout)} "
            f"(the whole compiler output: {log})"
        )


@dataclass
class _CudaBuild:
    """How a library's `.cu` sources are compiled: nvcc with the framework's includes and defines."""

    toolkit: CudaToolkit
    flags: list[str]  # nvcc's, before the source and output

    @classmethod
    def plan(
        cls,
        sources: list[Path],
        framework: FrameworkFlags,
        launcher: Launcher | None,
        compiler: str,
        std: str | None,
        compile_flags: list[str],
    ) -> _CudaBuild | None:
        if not has_cuda_sources(sources):
            return None
        if framework.framework == "pytorch" and not framework.cuda:
            raise BuildError(
                f"CUDA sources need a CUDA build of PyTorch, but the environment's torch "
                f"{framework.version} is CPU-only: install one built for your CUDA release "
                "(PyTorch's CUDA wheels, `pip install torch` from its CUDA wheel index)"
            )
        from opserve.ops.inspect import site_dirs

        toolkit = find_toolkit(hint=framework.cuda_home, site_dirs=site_dirs(launcher))
        if framework.cuda and int(framework.cuda.split(".")[0]) != toolkit.major:
            raise BuildError(
                f"nvcc ({toolkit.nvcc}) is CUDA {toolkit.version}, but torch {framework.version} "
                f"was built with CUDA {framework.cuda}: a library built so would not load beside "
                f"it; use a CUDA {framework.cuda.split('.')[0]} toolkit (CUDA_HOME=<folder>)"
            )
        standard = [f"-std={std}"] if std else [f for f in compile_flags if "-std=" in f][:1]
        passed = [f for f in compile_flags if f.startswith(("-I", "-D"))]
        flags = ["-c", "-O2", "-Xcompiler", "-fPIC", "-ccbin", compiler]
        flags += ["-" + f.lstrip("-") for f in standard]  # nvcc spells it -std=
        flags += [*architecture_flags(), *passed, f"-I{toolkit.include}"]
        if framework.framework == "pytorch":
            flags += _TORCH_NVCC_FLAGS
        return cls(toolkit, flags)

    def identity(self) -> list[str]:
        return [str(self.toolkit.nvcc), self.toolkit.version, *self.flags]

    def compile_command(self, source: Path, target: Path) -> list[str]:
        return [str(self.toolkit.nvcc), *self.flags, str(source), "-o", str(target)]


def model_operations_line(filename: str) -> str:
    """The config line that makes a model load the library."""
    return f'model_operations {{ op_library_filename: "{filename}" }}'


@dataclass
class ModelTarget:
    """What a model's worker will build against: its interpreter and its backend's framework."""

    launcher: Launcher
    framework: str | None
    environment: Path | None  # EXECUTION_ENV_PATH, when the model names one


def model_target(model_dir: Path) -> ModelTarget:
    """The interpreter (the model's EXECUTION_ENV_PATH environment, else the server's) and the
    framework of the model in `model_dir`, read from its config."""
    from opserve.config import model_config_for
    from opserve.ops.frameworks import BACKEND_FRAMEWORKS
    from opserve.workers.environments import execution_environment, resolve_environment

    model_dir = model_dir.resolve()
    config = model_config_for(model_dir.name, model_dir)
    environment = execution_environment(config, model_dir)
    launcher = Launcher()
    if environment is not None:
        launcher = resolve_environment(environment, dict(os.environ))
    return ModelTarget(launcher, BACKEND_FRAMEWORKS.get(config.backend), environment)
