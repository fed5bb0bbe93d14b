"""The `opserve` command line: `serve` (Triton's flag names) and what later grows beside it."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from opserve import __version__
from opserve.errors import OpserveError
from opserve.polling import DEFAULT_BUDGET_US
from opserve.remote.locations import repository_argument

if TYPE_CHECKING:
    from opserve.remote.mirror import RepositoryMirror
from opserve.triton_flags import add_triton_flags, parse_boolean, triton_values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opserve",
        description="A Triton-compatible inference server whose custom operations live with their models.",
    )
    parser.add_argument("--version", action="version", version=f"opserve {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser(
        "serve",
        help="serve a Triton model repository over the KServe V2 HTTP protocol",
        description="Serve one or more Triton model repositories. Flag names follow tritonserver's; "
        "a first argument 'tritonserver' (a Triton container's argument list) is skipped.",
    )
    serve.add_argument(
        "--model-repository",
        action="append",
        default=[],
        type=repository_argument,
        metavar="DIR",
        help="a Triton model repository (<DIR>/<model>/config.pbtxt and numeric version folders), "
        "or one in object storage (s3://bucket/path, s3://host:port/bucket/path, gs://bucket/path, "
        "as://account/container/path; pip install 'opserve[remote]'); "
        "repeat the flag to serve several (--model-store is the same)",
    )
    serve.add_argument(
        "--http-address",
        default="0.0.0.0",
        metavar="ADDR",
        help="address to bind HTTP to (default: 0.0.0.0)",
    )
    serve.add_argument(
        "--http-port",
        type=int,
        default=8000,
        metavar="PORT",
        help="HTTP port (default: 8000; 0 picks a free one)",
    )
    serve.add_argument(
        "--allow-grpc",
        type=parse_boolean,
        default=True,
        metavar="BOOL",
        help="serve gRPC (default: true)",
    )
    serve.add_argument(
        "--grpc-address",
        default="0.0.0.0",
        metavar="ADDR",
        help="address to bind gRPC to (default: 0.0.0.0)",
    )
    serve.add_argument(
        "--grpc-port", type=int, default=8001, metavar="PORT", help="gRPC port (default: 8001)"
    )
    serve.add_argument(
        "--allow-metrics",
        type=parse_boolean,
        default=True,
        metavar="BOOL",
        help="serve Prometheus metrics at /metrics (default: true)",
    )
    serve.add_argument(
        "--metrics-address",
        default="0.0.0.0",
        metavar="ADDR",
        help="address to bind metrics to (default: 0.0.0.0)",
    )
    serve.add_argument(
        "--metrics-port",
        type=int,
        default=8002,
        metavar="PORT",
        help="metrics port (default: 8002)",
    )
    serve.add_argument(
        "--op-library",
        action="append",
        default=[],
        type=Path,
        metavar="PATH",
        help="a custom-op library registered for every model of its framework (repeatable); "
        "libraries in LD_PRELOAD keep working as in Triton",
    )
    serve.add_argument(
        "--op-library-root",
        action="append",
        default=[],
        type=Path,
        metavar="DIR",
        help="a folder outside the model repositories from which a model's model_operations may "
        "name op libraries by absolute path (repeatable); relative paths always stay inside "
        "the model's folder",
    )
    serve.add_argument(
        "--model-control-mode",
        choices=["none", "explicit", "poll"],
        default="none",
        help="none (default): load every model at start-up and refuse load/unload requests; "
        "explicit: load only --load-model models, then load and unload through the "
        "repository API (POST /v2/repository/models/<model>/load and .../unload); "
        "poll: load every model, then follow the repositories: added, changed and removed "
        "models are loaded, reloaded and unloaded while the server runs",
    )
    serve.add_argument(
        "--repository-poll-secs",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="with --model-control-mode poll: how often to look at the repositories (default: "
        "15; 0: not at all, as in Triton)",
    )
    serve.add_argument(
        "--load-model",
        action="append",
        default=[],
        metavar="NAME",
        help="with --model-control-mode explicit: a model to load at start-up (repeatable; "
        "'*' loads them all)",
    )
    serve.add_argument(
        "--log-verbose",
        type=int,
        nargs="?",
        const=1,
        default=0,
        metavar="LEVEL",
        help="verbose logging: 0 (default) for INFO, 1 or more for DEBUG",
    )
    serve.add_argument(
        "--model-load-timeout-secs",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="how long a model instance may take to load (a Python model's "
        "auto_complete_config and initialize included), and how long its warm-up may take; "
        "one that takes longer is stopped and its model is UNAVAILABLE (default: 600)",
    )
    serve.add_argument(
        "--execution-timeout-secs",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="how long one execution of a model may run; a worker whose execute call has not "
        "returned by then is presumed hung: it is killed and replaced, and its requests fail "
        "(a model's parameter EXECUTION_TIMEOUT_SECS overrides it; default: 0, no limit)",
    )
    serve.add_argument(
        "--startup-wait-secs",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long start-up waits for the models to load before HTTP and gRPC open; models "
        "still loading then keep loading (LOADING, not ready) while the others are served "
        "(default: 60)",
    )
    serve.add_argument(
        "--cache-config",
        action="append",
        default=[],
        metavar="CACHE,KEY=VALUE",
        help="Triton's response cache: 'local,size=BYTES' gives the server an LRU cache of that "
        "many bytes, used by models whose config says response_cache { enable: true }",
    )
    serve.add_argument(
        "--shm-ring-bytes",
        type=int,
        default=None,
        metavar="N",
        help="shared memory per direction per worker for tensors, to begin with (default: 16 "
        "MiB); it grows for larger batches up to 1 GiB, beyond which tensors are sent through "
        "the worker's socket instead",
    )
    _add_bound_flags(serve)
    add_triton_flags(serve)
    parser.set_defaults(serve_parser=serve)
    check = commands.add_parser(
        "check",
        help="validate a model repository offline, before deployment",
        description="Validate every config, resolve and inspect every op library (in throwaway "
        "processes), report collisions inside a model and mismatches with the installed "
        "frameworks. Exits 1 when anything is wrong. Loads nothing into this process.",
    )
    check.add_argument(
        "--model-repository",
        action="append",
        required=True,
        type=repository_argument,
        metavar="DIR",
        help="a Triton model repository, or its s3://, gs:// or as:// URL (repeatable)",
    )
    check.add_argument(
        "--op-library",
        action="append",
        default=[],
        type=Path,
        metavar="PATH",
        help="a server-wide op library the server would load (repeatable)",
    )
    check.add_argument(
        "--op-library-root",
        action="append",
        default=[],
        type=Path,
        metavar="DIR",
        help="a folder from which models may name op libraries by absolute path",
    )
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument(
        "--verbose",
        action="store_true",
        help="name every op of each op library (by default: a count and the first few)",
    )

    ops = commands.add_parser("ops", help="custom-op library tools")
    ops_commands = ops.add_subparsers(dest="ops_command", metavar="COMMAND", required=True)
    inspect = ops_commands.add_parser(
        "inspect",
        help="inspect one custom-op library",
        description="Print which framework (and version) a library is built for, the shared "
        "libraries and symbols it needs that are missing, and the ops it registers. The "
        "library is loaded only in a throwaway process.",
    )
    inspect.add_argument("path", type=Path, metavar="PATH", help="the shared library")
    inspect.add_argument("--json", action="store_true", help="print the facts as JSON")
    add_build_command(ops_commands)
    return parser


def _add_bound_flags(serve: argparse.ArgumentParser) -> None:
    """What a client may cost the server (Triton has no flags for these; see also Triton's
    --http-max-input-size)."""
    group = serve.add_argument_group("bounds")
    group.add_argument(
        "--grpc-max-input-size",
        type=int,
        default=None,
        metavar="BYTES",
        help="the largest gRPC request message accepted (default: 2147483647, Triton's)",
    )
    group.add_argument(
        "--http-header-timeout-secs",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long a request's line and headers may take to arrive (default: 30); then 408 "
        "and the connection closes",
    )
    group.add_argument(
        "--http-body-timeout-secs",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="the longest pause while a request body arrives (default: 60); then 408 and the "
        "connection closes",
    )
    group.add_argument(
        "--http-first-request-timeout-secs",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long a new connection may wait before sending its first request (default: 30)",
    )
    group.add_argument(
        "--http-max-connections",
        type=int,
        default=0,
        metavar="N",
        help="open HTTP connections at most; past it a new connection is answered 503 and "
        "closed (default 0: half the file-descriptor limit)",
    )
    group.add_argument(
        "--max-instances-per-model",
        type=int,
        default=64,
        metavar="N",
        help="worker processes one model may start, all its versions together (default: 64); "
        "a config (or a load request's override) asking for more is refused",
    )
    group.add_argument(
        "--max-instances-total",
        type=int,
        default=512,
        metavar="N",
        help="worker processes of all models together (default: 512); a load that would pass "
        "it is refused",
    )
    group.add_argument(
        "--shared-workers",
        action="store_true",
        help="models without op libraries or an environment of their own (onnxruntime, "
        "pytorch, tensorflow; CPU instances) share one worker process per backend, each "
        "instance a slot of it: far less memory for many small models, but a crash of that "
        'process restarts all of them; a model opts out with parameter SHARED_WORKER "false"',
    )
    group.add_argument(
        "--busy-poll-us",
        type=int,
        default=DEFAULT_BUDGET_US,
        metavar="US",
        help="while requests are in flight, the event loop polls for that many microseconds "
        "after each request begins and ends instead of sleeping, and the worker running one "
        "polls as long for its next message (half as long while two or more are in flight) "
        f"(waking a sleeping process costs more than a small request; default: "
        f"{DEFAULT_BUDGET_US}; 0: always sleep, for the least CPU)",
    )


def add_build_command(ops_commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    build = ops_commands.add_parser(
        "build",
        help="build a custom-op library from C++ sources for the framework that will load it",
        description="Compile C++ op sources (and CUDA .cu sources, with nvcc) into one shared "
        "library with the headers, flags and ABI of the framework installed where the model's "
        "worker will run (with --model: that "
        "model's EXECUTION_ENV_PATH environment, else this one), inspect the result, and print "
        "the model_operations line that loads it. Builds are cached by sources, flags, "
        "framework version and compiler.",
    )
    build.add_argument(
        "sources",
        nargs="+",
        type=Path,
        metavar="SOURCE",
        help="C++ (.cc, .cpp) or CUDA (.cu) sources",
    )
    build.add_argument(
        "--framework",
        choices=["onnxruntime", "pytorch", "tensorflow"],
        help="the framework whose ops these are (default with --model: the model's backend)",
    )
    build.add_argument(
        "--model",
        type=Path,
        metavar="DIR",
        help="the model folder the library is for: build against its environment, and write "
        "the library into it (unless -o says otherwise)",
    )
    build.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="PATH",
        help="where to write the library (default: lib<first source>.so in the model's folder "
        "with --model, else in the current folder)",
    )
    build.add_argument(
        "-D",
        dest="defines",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="a preprocessor definition (repeatable)",
    )
    build.add_argument(
        "--std",
        metavar="STD",
        help="the C++ standard (default: c++20; TensorFlow: its own flags' c++17)",
    )
    build.add_argument(
        "--fetch-headers",
        action="store_true",
        help="ONNX Runtime: when no headers are found, download Debian's libonnxruntime-dev "
        "into the cache (not installed) and use its headers",
    )


def _repository_error(command: str, repositories: list[Path | str]) -> bool:
    """Print the one-line error of the first repository that cannot be served (it does not
    exist, or it is one model's folder); `serve` and `check` say it alike. A remote
    repository is judged once fetched (`_localize`)."""
    from opserve.repository.layout import repository_problem

    for repository in repositories:
        if not isinstance(repository, Path):
            continue
        problem = repository_problem(repository)
        if problem is not None:
            print(f"opserve {command}: error: {problem}", file=sys.stderr)
            return True
    return False


def _localize(
    command: str, repositories: list[Path | str]
) -> tuple[list[Path], list[RepositoryMirror]] | None:
    """Fetch the repositories given as URLs into their local mirrors (`opserve.remote`): the
    folders to read and the mirrors; None once the error (naming the URL) is printed."""
    if all(isinstance(r, Path) for r in repositories):
        return [r for r in repositories if isinstance(r, Path)], []
    from opserve.remote.repositories import localize

    try:
        folders, mirrors = localize(repositories)
    except OpserveError as exc:
        print(f"opserve {command}: error: {exc.message}", file=sys.stderr)
        return None
    if _repository_error(command, list(folders)):
        return None
    return folders, mirrors


def _check(args: argparse.Namespace) -> int:
    from opserve.check import check_repository, format_report

    if _repository_error("check", args.model_repository):
        return 2
    localized = _localize("check", args.model_repository)
    if localized is None:
        return 2
    report = check_repository(localized[0], args.op_library, args.op_library_root)
    print(
        json.dumps(report.to_json(), indent=2)
        if args.json
        else format_report(report, verbose=args.verbose)
    )
    return 0 if report.ok else 1


def _inspect(args: argparse.Namespace) -> int:
    from opserve.check import format_library
    from opserve.ops.inspect import inspect_library

    if not args.path.is_file():
        print(f"opserve ops inspect: error: '{args.path}' is not a file", file=sys.stderr)
        return 2
    report = inspect_library(args.path.resolve())
    print(json.dumps(report.to_json(), indent=2) if args.json else format_library(report))
    return 0 if report.ok else 1


def _ops_build(args: argparse.Namespace) -> int:
    from opserve.check import format_library
    from opserve.ops.build import ModelTarget, build_library, model_operations_line, model_target
    from opserve.ops.inspect import inspect_library
    from opserve.workers.launcher import Launcher

    def fail(message: str) -> int:
        print(f"opserve ops build: error: {message}", file=sys.stderr)
        return 2

    try:
        target = model_target(args.model) if args.model else None
    except OpserveError as exc:
        return fail(exc.message)
    framework = args.framework or (target.framework if target else None)
    if framework is None:
        return fail(
            "say which framework the ops are for: --framework onnxruntime|pytorch|tensorflow"
        )
    target = target or ModelTarget(Launcher(), framework, None)
    defines = dict(
        (d.split("=", 1)[0], d.split("=", 1)[1]) if "=" in d else (d, None) for d in args.defines
    )
    try:
        built = build_library(
            [s.resolve() for s in args.sources],
            framework,
            target.launcher,
            name=args.output.name if args.output else None,
            defines=defines,
            std=args.std,
            fetch_headers=args.fetch_headers,
        )
    except OpserveError as exc:
        return fail(exc.message)
    output = args.output or ((args.model or Path.cwd()) / built.path.name)
    output.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(built.path, output)
    where = f" in {target.environment}" if target.environment else ""
    print(
        f"{'reused' if built.cached else 'built'} {output} for {framework} "
        f"{built.framework_version}{where}"
    )
    # the probe's load catches undefined symbols; the static walk over the framework's own
    # symbol tables (`opserve ops inspect`) would add seconds to every build
    report = inspect_library(output.resolve(), symbols=False, launcher=target.launcher)
    print(format_library(report))
    if not report.ok:
        return 1
    model = args.model.resolve() if args.model else None
    inside = model is not None and output.resolve().is_relative_to(model)
    name = str(output.resolve().relative_to(model)) if inside and model else output.name
    print(
        model_operations_line(name)
        + ("" if inside else "  # with the library in the model's folder")
    )
    return 0


def configure_logging(verbose: int) -> None:
    """Plain logging for the commands other than `serve` (which installs the server's log)."""
    level = logging.DEBUG if verbose > 0 else logging.INFO
    os.environ["OPSERVE_LOG_LEVEL"] = logging.getLevelName(level)  # worker processes follow it
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def _reexec_without_preload(argv: list[str]) -> None:
    """Run the server without LD_PRELOAD: its libraries belong in the workers of their framework."""
    from opserve.ops import PRELOAD_HANDOFF

    preload = os.environ.get("LD_PRELOAD")
    if not preload or os.environ.get(PRELOAD_HANDOFF):
        return
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env[PRELOAD_HANDOFF] = preload
    os.execve(sys.executable, [sys.executable, "-c", _rerun_code(), *argv], env)


def _rerun_code() -> str:
    """Python code that runs this very `opserve` again, whatever the working directory holds
    (`python -m opserve` would take a folder named `opserve` there, a clone, for the package):
    this process's sys.path, then the folder that holds the running package."""
    import opserve

    package_root = str(Path(opserve.__file__).resolve().parent.parent)
    path = [*sys.path, package_root]
    return (
        f"import sys; sys.path[:] = {path!r}; "
        "from opserve.cli import main; raise SystemExit(main())"
    )


# A Triton container runs its arguments as a command, so a ServingRuntime written for Triton
# (KServe's kserve-tritonserver) starts its argument list with the program's name.
TRITON_PROGRAM = "tritonserver"


def without_triton_program(argv: list[str]) -> list[str]:
    """`serve tritonserver --flag ...` (Triton's argument list after an image whose entrypoint is
    `opserve serve`) is `serve --flag ...`."""
    if argv[:2] == ["serve", TRITON_PROGRAM]:
        return ["serve", *argv[2:]]
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = without_triton_program(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported under the usage line of the command that was run
        command_parser = (
            getattr(args, "serve_parser", parser) if args.command == "serve" else parser
        )
        command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "serve":
        # first, before anything is imported beside a preloaded library (TensorFlow's crashes
        # the process as soon as hashlib loads OpenSSL)
        _reexec_without_preload(argv)
        if _repository_error("serve", [*args.model_repository, *(args.model_store or [])]):
            return 2
        return _serve(args)
    if args.command == "check":
        return _check(args)
    if args.command == "ops":
        return _ops_build(args) if args.ops_command == "build" else _inspect(args)
    return 2


def _serve(args: argparse.Namespace) -> int:
    from opserve.allocator import keep_freed_memory
    from opserve.logs import LogSettings, ServerLog, log_file_path
    from opserve.server import run
    from opserve.settings import ServerSettings

    keep_freed_memory()  # tensors are copied in and out: no page faults for every copy

    try:
        triton, notes = triton_values(args)
        server_log = ServerLog(
            LogSettings(
                log_file=log_file_path(triton["log_file"]),
                log_info=triton["log_info"],
                log_warning=triton["log_warning"],
                log_error=triton["log_error"],
                log_verbose_level=args.log_verbose,
                log_format=triton["log_format"],
            )
        )
        server_log.install()
        for note in notes:
            logging.getLogger("opserve.cli").info("%s", note)
        localized = _localize("serve", [*args.model_repository, *triton["model_store"]])
        if localized is None:
            return 2
        settings = ServerSettings.from_flags(args, triton, *localized)
    except (ValueError, OSError) as exc:
        print(f"opserve serve: error: {exc}", file=sys.stderr)
        return 2
    try:
        return run(settings, server_log)
    except KeyboardInterrupt:
        return 0
    except OpserveError as exc:  # the repositories as a whole (one model name in two of them)
        print(f"opserve serve: error: {exc.message}", file=sys.stderr)
        return 2
