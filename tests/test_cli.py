"""The command line: help that explains every flag, and clear errors for bad flags."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
