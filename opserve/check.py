"""`opserve check`: validate a model repository offline, before deployment.

Every config is parsed and named, every version folder and model file looked for, every op
library resolved (with the same rules as the server), inspected in throwaway processes, and
checked against its model's framework and the other libraries of that model. Nothing is loaded
into this process.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from opserve.classification import output_labels
from opserve.config import model_config_for
from opserve.config.autocomplete import autocomplete
from opserve.config.normalize import visible_gpus
from opserve.config.support import check_fields
from opserve.config.validate import check_before_load, model_mismatches, validate_io
from opserve.ensemble import build_graph, check_steps, is_ensemble
from opserve.errors import OpserveError
from opserve.hints import missing_model_file
from opserve.ops import BACKEND_FRAMEWORKS, library_framework, preloaded_libraries
from opserve.ops.build import build_library
from opserve.ops.inspect import LibraryReport, collisions, framework_mismatch, inspect_library
from opserve.ops.model_probe import ModelFacts, ModelJob, probe_models
from opserve.ops.needs import (
    candidate_libraries,
    missing_op_problem,
    missing_ops,
    unlisted_library_hint,
)
from opserve.ops.resolve import model_op_sources, resolve_model_libraries
from opserve.proto import ModelConfig
from opserve.repository.confinement import confine_model_files
from opserve.repository.layout import (
    find_models,
    no_versions_reason,
    select_versions,
    version_folders,
)
from opserve.schema import ModelSchema
from opserve.sequence_config import SequenceSettings
from opserve.warmup import warmup_samples
from opserve.workers.environments import execution_environment, resolve_environment
from opserve.workers.launcher import Launcher

# backend -> (the package that must be importable, the extra that installs it)
_FRAMEWORK_PACKAGES = {
    "onnxruntime": ("onnxruntime", "onnxruntime"),
    "pytorch": ("torch", "pytorch"),
    "tensorflow": ("tensorflow", "tensorflow"),
    "python": ("numpy", ""),  # a Python model needs nothing beyond the server's own packages
}


@dataclass
class ModelReport:
    name: str
    backend: str = ""
    versions: list[int] = field(default_factory=list)
    libraries: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # fields ignored where that changes no answer

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class RepositoryReport:
    models: list[ModelReport]
    libraries: dict[str, LibraryReport]
    problems: list[str]  # repository-wide (duplicate names, unreadable folders, bad --op-library)

    @property
    def ok(self) -> bool:
        return not self.problems and all(m.ok for m in self.models)

    def to_json(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "problems": self.problems,
            "models": [{**m.__dict__, "ok": m.ok} for m in self.models],
            "libraries": {path: report.to_json() for path, report in self.libraries.items()},
        }


def check_repository(
    repositories: list[Path],
    op_libraries: list[Path] | None = None,
    op_library_roots: list[Path] | None = None,
) -> RepositoryReport:
    roots = [p.resolve() for p in repositories] + [p.resolve() for p in op_library_roots or []]
    libraries: dict[str, LibraryReport] = {}
    problems: list[str] = []

    by_interpreter: dict[tuple[str, str], LibraryReport] = {}

    def inspected(path: Path, launcher: Launcher | None = None) -> LibraryReport:
        """A library as the framework of the model's own interpreter sees it."""
        key = (str(path), launcher.executable if launcher else "")
        if key not in by_interpreter:
            by_interpreter[key] = inspect_library(path, launcher=launcher)
            libraries[str(path)] = by_interpreter[key]
        return by_interpreter[key]

    shared: dict[str | None, list[Path]] = {}
    for library in [*(op_libraries or []), *preloaded_libraries()]:
        try:
            framework = library_framework(library)
        except OpserveError as exc:
            problems.append(f"op library '{library}' is {exc.message}")
            continue
        shared.setdefault(framework, []).append(library.resolve())
        problems += inspected(library.resolve()).problems
    try:
        folders = find_models(repositories)
    except OpserveError as exc:
        return RepositoryReport([], libraries, [*problems, exc.message])
    loads: list[_Load] = []
    reports = [
        _check_model(name, folder, roots, shared, inspected, folders, loads)
        for name, folder in folders.items()
    ]
    for load, facts in zip(loads, probe_models([load.job for load in loads]), strict=True):
        _compare_with_model(load, facts, inspected)
    return RepositoryReport(reports, libraries, problems)


@dataclass
class _Load:
    """A model version whose libraries passed: the probe loads it as its worker would."""

    report: ModelReport
    version: int
    job: ModelJob
    libraries: list[LibraryReport]  # every library its worker would load


def _compare_with_model(
    load: _Load, facts: ModelFacts, inspected: Callable[[Path], LibraryReport]
) -> None:
    """The custom ops the model uses against the ops its libraries register (with the line to
    add for a library that registers a missing one), and the config against the model."""
    report, job = load.report, load.job
    prefix = f"version {load.version}: "
    framework = BACKEND_FRAMEWORKS[job.config.backend]
    registered = [op for library in load.libraries for op in library.ops]
    missing = missing_ops(facts.uses, registered)
    for op in missing:
        hint = None
        for path in candidate_libraries(job.model_dir, job.op_libraries):
            if _framework_of(path) == framework and op in inspected(path).ops:
                hint = unlisted_library_hint(op, path, job.model_dir, job.version_dir)
                break
        report.problems.append(prefix + missing_op_problem(op, framework, hint))
    if facts.uses_error:
        report.warnings.append(f"{prefix}its custom ops could not be listed: {facts.uses_error}")
    if facts.signature is not None:
        completed = ModelConfig()
        completed.CopyFrom(job.config)
        autocomplete(completed, facts.signature)
        report.problems += [
            prefix + p
            for p in model_mismatches(completed, facts.signature)
            if prefix + p not in report.problems
        ]
    elif facts.error and not missing:
        report.problems.append(prefix + facts.error)


def _framework_of(path: Path) -> str | None:
    try:
        return library_framework(path)
    except OpserveError:
        return None


def _check_model(name, folder, roots, shared, inspected, folders, loads) -> ModelReport:  # type: ignore[no-untyped-def]
    report = ModelReport(name)
    try:
        config = model_config_for(name, folder)
    except OpserveError as exc:
        report.problems.append(exc.message)
        return report
    try:  # Triton's rules, as the server checks them before loading
        check_before_load(config, gpus=visible_gpus())
    except OpserveError as exc:
        report.problems.append(exc.message)
    try:  # the files it names stay in its folder, its labels can be read: as at load
        confine_model_files(config, folder, roots, from_request=False)
        output_labels(config, folder)
    except OpserveError as exc:
        report.problems.append(exc.message)
    available = version_folders(folder)
    if config.backend == "python" and not _completes_its_config(available.values(), config):
        try:  # no auto_complete_config to add to its tensors: they must be whole as written
            validate_io(config, io_complete=True)
        except OpserveError as exc:
            report.problems.append(exc.message)
    if is_ensemble(config):
        report.backend = config.platform
        report.versions = select_versions(config, available)
        if not report.versions:
            report.problems.append(no_versions_reason(config, folder, available))
        report.problems += ensemble_problems(config, folders)
        return report
    report.backend = config.backend
    findings = check_fields(config)
    report.problems += findings.errors
    report.warnings += findings.warnings
    if config.model_warmup and config.input:  # a config that auto-complete leaves alone
        try:
            warmup_samples(config, ModelSchema.from_config(config), folder)
        except OpserveError as exc:
            report.problems.append(exc.message)
    launcher: Launcher | None = None
    try:
        environment = execution_environment(config, folder)
        if environment is not None:
            launcher = resolve_environment(environment, dict(os.environ))
    except OpserveError as exc:
        report.problems.append(exc.message)
    package, extra = _FRAMEWORK_PACKAGES.get(config.backend, (None, None))
    framework_installed = False
    if package is None:
        report.problems.append(f"backend '{config.backend}' is not supported by this server")
    elif launcher is None and importlib.util.find_spec(package) is None:
        report.problems.append(
            f"backend '{config.backend}' needs {package}: pip install 'opserve[{extra}]'"
        )
    else:
        framework_installed = True
    if config.HasField("sequence_batching"):
        try:
            SequenceSettings.from_config(config, folder)
        except OpserveError as exc:
            report.problems.append(exc.message)
    report.versions = select_versions(config, available)
    if not report.versions:
        report.problems.append(no_versions_reason(config, folder, available))
    framework = BACKEND_FRAMEWORKS.get(config.backend)
    built = _built_from_sources(config, folder, framework, launcher, report)
    for version in report.versions:
        version_dir = folder / str(version)
        model_file = version_dir / config.default_model_filename
        if not model_file.exists():
            report.problems.append(f"version {version}: {missing_model_file(model_file)}")
        try:
            own = resolve_model_libraries(config, folder, version_dir, roots) + built
        except OpserveError as exc:
            report.problems.append(f"version {version}: {exc.message}")
            continue
        library_reports = [inspected(p, launcher) for p in [*own, *shared.get(framework, [])]]
        for library in own:
            if str(library) not in report.libraries:
                report.libraries.append(str(library))
        before = len(report.problems)
        for library_report in library_reports[: len(own)]:
            report.problems += [p for p in library_report.problems if p not in report.problems]
            mismatch = framework_mismatch(library_report, name, config.backend)
            if mismatch is not None:
                report.problems.append(mismatch)
        report.problems += [f"version {version}: {c}" for c in collisions(library_reports)]
        libraries_ok = len(report.problems) == before and all(r.ok for r in library_reports)
        if framework_installed and framework is not None and model_file.exists() and libraries_ok:
            # server-wide and preloaded libraries: loaded after the model's own, in that order
            job = ModelJob(config, folder, version_dir, own, shared.get(framework, []))
            loads.append(_Load(report, version, job, library_reports))
    return report


def _completes_its_config(version_dirs: Iterable[Path], config: ModelConfig) -> bool:
    """Whether a Python model's class, in any of its version folders, has
    `auto_complete_config` (read from its source, not run): then the server completes its
    config at load, and its tensors may be partial here. A source that cannot be read or
    parsed counts as one that may complete it."""
    filename = config.default_model_filename or "model.py"
    for version_dir in version_dirs:
        source = version_dir / filename
        if not source.is_file():
            continue
        try:
            tree = ast.parse(source.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError):
            return True
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name == "TritonPythonModel":
                if any(
                    isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and item.name == "auto_complete_config"
                    for item in node.body
                ):
                    return True
    return False


def _built_from_sources(
    config: ModelConfig,
    folder: Path,
    framework: str | None,
    launcher: Launcher | None,
    report: ModelReport,
) -> list[Path]:
    """The library the model's op sources build into (as the load builds it, cached)."""
    try:
        sources = model_op_sources(config, folder)
        if not sources:
            return []
        if framework is None:
            report.problems.append(
                f"OP_LIBRARY_SOURCES are built for the model's framework; backend "
                f"'{config.backend}' has none"
            )
            return []
        return [build_library(sources, framework, launcher).path]
    except OpserveError as exc:
        report.problems.append(exc.message)
        return []


def ensemble_problems(config: ModelConfig, folders: dict[str, Path]) -> list[str]:
    """The ensemble's graph, and its steps against their models' configs as written (a step
    model that leaves its inputs or outputs to auto-complete is not checked on that side)."""
    name = config.name
    try:
        graph = build_graph(config)
    except OpserveError as exc:
        return [exc.message]
    missing = [m for m in graph.model_names if m not in folders]
    if missing:
        return [
            f"ensemble {name} contains models that are not available or ambiguous: "
            + ", ".join(missing)
        ]
    configs = {}
    for model in graph.model_names:
        try:
            configs[model] = model_config_for(model, folders[model])
        except OpserveError as exc:
            return [
                f"ensemble '{name}' depends on '{model}' which is not valid. Model '{model}' "
                f"failed with error: {exc.message}"
            ]
    try:
        check_steps(config, graph, configs)
    except OpserveError as exc:
        return [exc.message]
    return []


SHOWN_OPS = 5  # ops of a library that `opserve check` names without --verbose


def describe_ops(ops: list[str], verbose: bool = False) -> str:
    """A library's ops: all of them when few or `verbose`, else a count and the first few."""
    if not ops:
        return "no ops found"
    if verbose or len(ops) <= SHOWN_OPS:
        return ", ".join(ops)
    return f"{len(ops)} ops: {', '.join(ops[:SHOWN_OPS])}, ... (--verbose lists them all)"


def format_report(report: RepositoryReport, verbose: bool = False) -> str:
    lines: list[str] = []
    for problem in report.problems:
        lines.append(f"error: {problem}")
    for model in report.models:
        status = "ok" if model.ok else "FAILED"
        versions = ", ".join(map(str, model.versions)) or "none"
        lines.append(
            f"{status:6} {model.name} ({model.backend or 'unknown backend'}; versions {versions})"
        )
        for library in model.libraries:
            facts = report.libraries.get(library)
            ops = describe_ops(facts.ops if facts else [], verbose)
            lines.append(f"         op library {library}: {ops}")
        for problem in model.problems:
            lines.append(f"         error: {problem}")
        for warning in model.warnings:
            lines.append(f"         warning: {warning}")
    failed = sum(not m.ok for m in report.models)
    lines.append(
        f"{len(report.models)} models, {failed} with problems"
        + (f", {len(report.problems)} repository problems" if report.problems else "")
    )
    return "\n".join(lines)


def format_library(report: LibraryReport) -> str:
    lines = [f"library:    {report.path}"]
    lines.append(
        f"framework:  {report.framework or 'none recognised'}"
        + (f" (installed: {report.framework_version})" if report.framework_version else "")
    )
    if report.api_version is not None:
        lines.append(f"ORT API:    version {report.api_version} requested")
    lines.append("needs:")
    for soname, found in report.needed.items():
        lines.append(f"  {soname} => {found or 'NOT FOUND'}")
    if report.unresolved_symbols:
        shown = report.unresolved_symbols[:20]
        more = len(report.unresolved_symbols) - len(shown)
        lines.append("symbols no needed library defines:" + (f" ({more} more)" if more else ""))
        lines += [f"  {symbol}" for symbol in shown]
    lines.append("ops:        " + (", ".join(report.ops) if report.ops else "none found"))
    lines += [f"error:      {p}" for p in report.problems]
    lines.append("verdict:    " + ("ok" if report.ok else "FAILED"))
    return "\n".join(lines)
