"""Inspecting a custom-op library before it is used for real.

Static facts come from the ELF file (never loaded here): the framework it links against, the
shared libraries it needs and where they are found, and (for `opserve ops inspect` and
`opserve check`) the symbols none of them defines. Dynamic facts come from a probe in a throwaway
process (`opserve.ops.probe`): the ops it registers, the framework version, and whether that
framework can load it at all. The verdict is the list of problems, each naming the library.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from opserve.errors import OpserveError
from opserve.ops.elf import read_elf
from opserve.ops.frameworks import (
    BACKEND_FRAMEWORKS,
    PYTHON_OPS_SUFFIX,
    framework_library_dir,
    library_framework,
)
from opserve.ops.probe import API_VERSION_MARK, api_mismatch
from opserve.workers.launcher import Launcher

PROBE_TIMEOUT_S = 180.0
_SYSTEM_DIRS = (
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
)
FRAMEWORK_NAMES = {
    "onnxruntime": "ONNX Runtime",
    "pytorch": "libtorch",
    "tensorflow": "TensorFlow",
}


@dataclass
class LibraryReport:
    path: str
    framework: str | None = None
    framework_version: str | None = None  # of the installed framework
    needed: dict[str, str | None] = field(default_factory=dict)  # soname -> where it was found
    unresolved_symbols: list[str] = field(
        default_factory=list
    )  # static check; may be provided at run time
    ops: list[str] = field(default_factory=list)
    api_version: int | None = None  # ONNX Runtime: the API version the library asked for
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "ok": self.ok}

    def reason(self) -> str:
        return "; ".join(self.problems)


@functools.cache
def _ldconfig_cache() -> dict[str, str]:
    try:
        output = subprocess.run(
            ["ldconfig", "-p"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    found: dict[str, str] = {}
    for line in output.splitlines()[1:]:
        name, _, target = line.strip().partition(" => ")
        if target and ("x86-64" in name or "x86_64" in target):
            found.setdefault(name.split(" ")[0], target)
    return found


def _find(
    soname: str,
    library: Path,
    runpath: tuple[str, ...],
    framework: str | None,
    site_dirs: list[str] | None = None,
) -> str | None:
    directories = [p.replace("$ORIGIN", str(library.parent)) for p in runpath]
    if framework is not None:
        framework_dir = framework_library_dir(framework, site_dirs)
        if framework_dir is not None:
            directories.append(str(framework_dir))
    directories += [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    for directory in directories:
        candidate = Path(directory) / soname
        if candidate.exists():
            return str(candidate)
    if soname in _ldconfig_cache():
        return _ldconfig_cache()[soname]
    for directory in _SYSTEM_DIRS:
        candidate = Path(directory) / soname
        if candidate.exists():
            return str(candidate)
    return None


def _unresolved(path: Path, needed: dict[str, str | None]) -> list[str]:
    """Undefined symbols that neither the needed libraries nor theirs define (the interpreter's
    own `Py*` symbols are taken as given)."""
    wanted = set(read_elf(path).undefined)
    seen: set[str] = set()
    queue = [p for p in needed.values() if p]
    while queue and wanted:
        library = queue.pop(0)
        if library in seen:
            continue
        seen.add(library)
        try:
            facts = read_elf(Path(library))
        except OpserveError:
            continue
        wanted -= facts.defined
        if len(seen) < 24:  # one or two levels deep is where a library's symbols come from
            for soname in facts.needed:
                found = _find(soname, Path(library), facts.runpath, None)
                if found:
                    queue.append(found)
    return sorted(s for s in wanted if not s.startswith(("Py", "_Py")))


def site_dirs(launcher: Launcher | None) -> list[str] | None:
    """The site-packages folders of another environment's interpreter (None: the server's)."""
    if launcher is None or launcher.executable == sys.executable:
        return None
    root = Path(launcher.executable).parent.parent
    return [str(p) for p in sorted(root.glob("lib/python3*/site-packages"))]


def static_report(
    path: Path, symbols: bool = False, launcher: Launcher | None = None
) -> LibraryReport:
    """What the ELF file says; `symbols` adds the (slower) unresolved-symbol check. The
    framework's libraries are looked for in `launcher`'s environment."""
    report = LibraryReport(str(path))
    if path.suffix == PYTHON_OPS_SUFFIX:  # ONNX Runtime ops in Python: only the probe knows
        report.framework = "onnxruntime"
        return report
    try:
        facts = read_elf(path)
        report.framework = library_framework(path)
    except OpserveError as exc:
        report.problems.append(f"op library '{path}' is {exc.message}")
        return report
    where = site_dirs(launcher)
    report.needed = {
        n: _find(n, path, facts.runpath, report.framework, where) for n in facts.needed
    }
    missing = [n for n, found in report.needed.items() if found is None]
    if missing:
        report.problems.append(
            f"op library '{path}' needs shared libraries that are not found: {', '.join(missing)}"
        )
    if symbols:
        report.unresolved_symbols = _unresolved(path, report.needed)
    if report.framework is None:
        report.problems.append(
            f"op library '{path}' links against no framework opserve knows "
            "(libtorch, libtensorflow_framework) and exports no RegisterCustomOps (ONNX Runtime)"
        )
    return report


def _apply_probe(
    report: LibraryReport, stdout: str, stderr: str, returncode: int, python: str
) -> None:
    requested = [
        int(line[len(API_VERSION_MARK) :])
        for line in stderr.splitlines()
        if line.startswith(API_VERSION_MARK)
    ]
    if requested:
        report.api_version = max(requested)
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if returncode != 0 or not lines:
        detail = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {returncode}"
        if returncode < 0:
            detail = f"killed by signal {-returncode}; {detail}"
        if report.api_version is not None and report.framework == "onnxruntime":
            # a library whose API version the runtime lacks gets no API table, and crashes
            report.problems.append(
                f"op library '{report.path}': {api_mismatch(report.api_version, _onnxruntime_version(python))}"
            )
        else:
            report.problems.append(f"op library '{report.path}' crashed its inspection: {detail}")
        return
    result = json.loads(lines[-1])
    report.framework_version = result.get("framework_version")
    report.ops = list(result.get("ops") or [])
    if result.get("api_version") is not None:
        report.api_version = result["api_version"]
    error = result.get("error")
    if error:
        reason = f"op library '{report.path}': {error}"
        whose = "this server's" if python == sys.executable else f"the environment's ({python})"
        if "undefined symbol" in error and report.framework is not None:
            reason += (
                f" (it was built for a different {FRAMEWORK_NAMES[report.framework]} than "
                f"{whose} {report.framework_version or 'installed one'})"
            )
        report.problems.append(reason)


@functools.cache
def _onnxruntime_version(python: str) -> str:
    result = subprocess.run(
        [python, "-c", "import onnxruntime; print(onnxruntime.__version__)"],
        capture_output=True,
        text=True,
    )
    return result.stdout.strip() or "unknown"


def _probe_command(report: LibraryReport, launcher: Launcher) -> list[str]:
    probe = report.framework or "loader"
    if report.path.endswith(PYTHON_OPS_SUFFIX):
        probe = "python_ops"
    return [launcher.executable, "-m", "opserve.ops.probe", probe, report.path]


def inspect_library(
    path: Path, symbols: bool = True, launcher: Launcher | None = None
) -> LibraryReport:
    """Every fact about one library (blocking; for the command line), as the framework of
    `launcher`'s interpreter (default: the server's) sees it."""
    launcher = launcher or Launcher()
    report = static_report(path, symbols, launcher)
    try:
        result = subprocess.run(
            _probe_command(report, launcher),
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            env=launcher.env,
        )
    except subprocess.TimeoutExpired:
        report.problems.append(
            f"op library '{path}': its inspection took longer than {PROBE_TIMEOUT_S:.0f} s"
        )
        return report
    _apply_probe(report, result.stdout, result.stderr, result.returncode, launcher.executable)
    return report


_cache: dict[tuple[str, int, int, str], LibraryReport] = {}


async def inspect_library_async(path: Path, launcher: Launcher | None = None) -> LibraryReport:
    """Inspection for the server, under the interpreter the model's worker will run
    (`launcher`): cached while the file is unchanged; the probe never blocks the event loop."""
    launcher = launcher or Launcher()
    try:
        stat = path.stat()
    except OSError as exc:
        return LibraryReport(str(path), problems=[f"op library '{path}': {exc}"])
    key = (str(path), stat.st_mtime_ns, stat.st_size, launcher.executable)
    if key in _cache:
        return _cache[key]
    report = await asyncio.to_thread(static_report, path, False, launcher)
    process = await asyncio.create_subprocess_exec(
        *_probe_command(report, launcher),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=launcher.env,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), PROBE_TIMEOUT_S)
    except asyncio.TimeoutError:
        process.kill()
        report.problems.append(
            f"op library '{path}': its inspection took longer than {PROBE_TIMEOUT_S:.0f} s"
        )
        return report
    _apply_probe(
        report,
        stdout.decode(errors="replace"),
        stderr.decode(errors="replace"),
        process.returncode or 0,
        launcher.executable,
    )
    _cache[key] = report
    return report


def framework_mismatch(report: LibraryReport, model: str, backend: str) -> str | None:
    """A model's own library built for another framework than its backend's, as a message.
    A Python model may use any framework's ops (it loads each with its framework)."""
    wanted = BACKEND_FRAMEWORKS.get(backend)
    if backend == "python" or report.framework in (None, wanted):
        return None
    return (
        f"op library '{report.path}' is built for {report.framework}, but model '{model}' "
        f"runs on {backend}"
    )


def collisions(reports: list[LibraryReport]) -> list[str]:
    """Ops that two libraries of one process would both register, each as a message naming both."""
    owner: dict[str, str] = {}
    problems = []
    for report in reports:
        for op in report.ops:
            if op in owner and owner[op] != report.path:
                problems.append(
                    f"op '{op}' is registered by both '{owner[op]}' and '{report.path}'"
                )
            else:
                owner[op] = report.path
    return problems
