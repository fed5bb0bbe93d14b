"""The command line: help that explains every flag, and clear errors for bad flags."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests import models
from tests.serving import children, mapped


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "opserve", *args], capture_output=True, text=True, timeout=60
    )


def test_top_level_help() -> None:
    result = run("--help")
    assert result.returncode == 0
    assert "serve" in result.stdout


def test_serve_help_explains_every_flag() -> None:
    result = run("serve", "--help")
    assert result.returncode == 0
    for flag in (
        "--model-repository",
        "--http-address",
        "--http-port",
        "--op-library",
        "--log-verbose",
    ):
        assert flag in result.stdout
    assert "LD_PRELOAD" in result.stdout


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("opserve")  # beside the interpreter that runs the tests
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("opserve ")


def test_missing_repository_flag_is_an_error() -> None:
    result = run("serve")
    assert result.returncode == 2
    assert "--model-repository" in result.stderr


def test_missing_op_library_is_an_error(tmp_path) -> None:
    result = run(
        "serve", "--model-repository", str(tmp_path), "--op-library", str(tmp_path / "nope.so")
    )
    assert result.returncode == 2
    assert "nope.so" in result.stderr and "does not exist" in result.stderr


def test_server_core_imports_no_framework() -> None:
    code = (
        "import sys, opserve.server, opserve.cli, opserve.dataplane;"
        "bad = [m for m in ('onnxruntime', 'torch', 'tensorflow', 'onnx') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_models_run_in_worker_processes_not_in_the_server(server) -> None:
    """At run time the server process has no framework mapped; its worker children do."""
    workers = children(server.process.pid)
    assert workers, "the server has no worker processes"
    assert not mapped(server.process.pid, "onnxruntime")
    assert any(mapped(worker, "onnxruntime") for worker in workers)


def test_serve_and_check_say_alike_that_a_repository_does_not_exist(tmp_path) -> None:
    missing = tmp_path / "nope"
    for command in ("serve", "check"):
        result = run(command, "--model-repository", str(missing))
        assert result.returncode == 2
        assert result.stderr == (
            f"opserve {command}: error: model repository '{missing}' does not exist\n"
        )


def test_a_model_folder_passed_as_the_repository_names_the_folder_to_pass(tmp_path) -> None:
    repository = tmp_path / "repo"
    folder = models.write_model(repository, "simple", models.identity(), 'name: "simple"\n')
    for command in ("serve", "check"):
        result = run(command, "--model-repository", str(folder))
        assert result.returncode == 2
        assert result.stderr == (
            f"opserve {command}: error: '{folder}' looks like a model folder, not a model "
            f"repository: it holds config.pbtxt and the version folder 1/; pass the folder "
            f"that contains it: --model-repository {repository}\n"
        )


def test_check_counts_the_ops_of_a_library_unless_verbose(example_repository: Path) -> None:
    library = example_repository / "text_ops" / "libortextensions.so"
    short = run("check", "--model-repository", str(example_repository))
    assert short.returncode == 0, short.stdout + short.stderr
    line = next(x for x in short.stdout.splitlines() if f"op library {library}" in x)
    count = int(line.split(": ", 1)[1].split(" ops: ")[0])
    assert count > 5 and line.endswith(", ... (--verbose lists them all)")
    assert len(line.split(" ops: ")[1].split(", ")) == 6  # the first five, then "..."
    verbose = run("check", "--model-repository", str(example_repository), "--verbose")
    line = next(x for x in verbose.stdout.splitlines() if f"op library {library}" in x)
    assert len(line.split(": ", 1)[1].split(", ")) == count


def test_the_command_line_loads_nothing_that_crashes_beside_a_preloaded_library() -> None:
    """`opserve serve` hands LD_PRELOAD over to its workers after parsing its arguments; until
    then nothing may load OpenSSL (hashlib, ssl): it crashes beside a preloaded TensorFlow."""
    probe = (
        "import sys, opserve.cli; "
        "print(sorted(m for m in sys.modules if m in ('hashlib', '_hashlib', 'ssl', '_ssl')))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
