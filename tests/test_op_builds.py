"""Building ops for the framework that runs them (`opserve ops build`, op sources a model ships)
and one framework version per model (`EXECUTION_ENV_PATH` for every backend)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from opserve.errors import UnavailableError
from opserve.ops.build import first_error
from opserve.ops.headers import api_problem
from opserve.ops.resolve import model_op_sources
from opserve.proto import ModelConfig
from tests import models
from tests.conftest import ROOT
from tests.oplibs import build
from tests.oplibs.build import opserve
from tests.serving import RunningServer

ORT_SOURCE = build.SOURCES / "onnxruntime" / "my_ops.cc"
# two onnxruntime releases pip installs for Python 3.10+; the headers the tests build with are
# API 21, which both serve
OLD_ORT, OTHER_ORT = "1.21.1", "1.23.2"


@pytest.fixture(scope="module")
def ort_headers() -> Path:
    return build.onnxruntime_headers()


def onnxruntime_environment(version: str) -> Path:
    """A virtual environment holding onnxruntime `version` and numpy, nothing else (cached
    under .cache/environments; about 15 s to make)."""
    key = f"py{sys.version_info.major}{sys.version_info.minor}-onnxruntime{version}"
    env = build.CACHE / "environments" / key
    if not (env / ".complete").exists():
        shutil.rmtree(env, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
        site = next((env / "lib").glob("python3*/site-packages"))
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site)]
            + [f"onnxruntime=={version}", f"numpy=={np.__version__}"],
            check=True,
        )
        (env / ".complete").touch()
    return env


def env_config(environment: Path) -> str:
    return (
        'backend: "onnxruntime"\nmax_batch_size: 4\n'
        f'parameters {{ key: "EXECUTION_ENV_PATH" value: {{ string_value: "{environment}" }} }}\n'
    )


def unavailable_reason(url: str, model: str) -> str:
    answer = requests.get(f"http://{url}/v2/models/{model}/ready", timeout=30)
    assert answer.status_code == 400
    return answer.json()["error"]


def add_one(url: str, model: str, protocol=httpclient) -> np.ndarray:
    client = protocol.InferenceServerClient(url)
    x = np.zeros((1, 4), dtype=np.float32)
    tensor = protocol.InferInput("INPUT0", [1, 4], "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer(model, [tensor]).as_numpy("OUTPUT0")


# pure rules ---------------------------------------------------------------------------------------
def test_first_error_is_the_compilers_first_error_line() -> None:
    output = (
        "x.cc: In function 'int f()':\n"
        "x.cc:3:5: error: 'nope' was not declared in this scope\n"
        "x.cc:4:1: error: expected ';'\n"
    )
    assert first_error(output) == "x.cc:3:5: error: 'nope' was not declared in this scope"
    linker = "/usr/bin/ld: a.o: undefined reference to `g()'\ncollect2: error: ld returned 1\n"
    assert "undefined reference to `g()'" in first_error(linker)


def test_headers_newer_than_the_runtime_are_refused() -> None:
    assert api_problem(21, "1.32.0", Path("/h")) is None
    assert api_problem(21, "1.21.1", Path("/h")) is None
    problem = api_problem(21, "1.20.1", Path("/h"))
    assert problem and "API version 21" in problem and "onnxruntime 1.20 or older" in problem


def test_op_sources_stay_inside_the_model_folder(tmp_path: Path) -> None:
    (tmp_path / "m" / "ops").mkdir(parents=True)
    (tmp_path / "m" / "ops" / "a.cc").write_text("")
    config = ModelConfig(name="m")
    config.parameters["OP_LIBRARY_SOURCES"].string_value = "ops/a.cc, ops/b.cc"
    with pytest.raises(UnavailableError, match=r"op source 'ops/b.cc'.*was not found"):
        model_op_sources(config, tmp_path / "m")
    config.parameters["OP_LIBRARY_SOURCES"].string_value = "../x.cc"
    with pytest.raises(UnavailableError, match="not inside the model's folder"):
        model_op_sources(config, tmp_path / "m")
    config.parameters["OP_LIBRARY_SOURCES"].string_value = "ops/a.cc"
    assert model_op_sources(config, tmp_path / "m") == [tmp_path / "m" / "ops" / "a.cc"]


# the command's error paths ------------------------------------------------------------------------
def test_no_compiler_is_named_with_how_to_get_one(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CXX"}
    env["PATH"] = str(tmp_path)  # no g++, no c++ there
    result = subprocess.run(
        [sys.executable, "-m", "opserve", "ops", "build", str(ORT_SOURCE)]
        + ["--framework", "onnxruntime"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "no C++ compiler found" in result.stderr and "apt-get install g++" in result.stderr


def test_a_compile_error_is_its_first_line(tmp_path: Path, ort_headers: Path) -> None:
    source = tmp_path / "broken_op.cc"
    source.write_text('#include "onnxruntime_c_api.h"\nint f() { return nope; }\n')
    result = opserve(
        "ops", "build", str(source), "--framework", "onnxruntime",
        env={"ORT_INCLUDE_DIR": str(ort_headers)},
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"{source}:2:18: error: " in result.stderr  # quotes follow the locale
    assert "nope" in result.stderr and "was not declared in this scope" in result.stderr
    assert "failed" in result.stderr and "build.log" in result.stderr
    assert not (tmp_path / "libbroken_op.so").exists()


def test_missing_headers_say_how_to_get_them(tmp_path: Path) -> None:
    result = opserve(
        "ops", "build", str(ORT_SOURCE), "--framework", "onnxruntime",
        env={"ORT_INCLUDE_DIR": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 2
    assert f"ORT_INCLUDE_DIR={tmp_path} holds no onnxruntime_cxx_api.h" in result.stderr
    assert "--fetch-headers" in result.stderr and "libonnxruntime-dev" in result.stderr


# the README's guide, run as written ---------------------------------------------------------------
def guide_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    guide = text.split("<!-- op-guide -->", 1)[1].split("<!-- /op-guide -->", 1)[0]
    return [b.strip() for b in re.findall(r"^```bash\n(.*?)^```", guide, flags=re.S | re.M)]


GUIDE = {  # framework -> (the package it needs, the op the library must register)
    "onnxruntime": ("onnxruntime", "my_ops::AddOne"),
    "pytorch": ("torch", "my_ops::add_one"),
    "tensorflow": ("tensorflow", "ZeroOut"),
}


@pytest.mark.parametrize("framework", list(GUIDE))
def test_the_readme_op_guide_builds_each_framework(framework: str, tmp_path: Path) -> None:
    package, op = GUIDE[framework]
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed")
    (command,) = [c for c in guide_commands() if f"--framework {framework}" in c]
    (tmp_path / "tests").symlink_to(ROOT / "tests")  # the commands run from the repository root
    env = {
        **os.environ,
        "OPSERVE_CACHE_DIR": str(build.CACHE),  # the test suite's builds of the same sources
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
    }
    result = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    output = re.search(r"-o (\S+)", command)
    assert output and (tmp_path / output.group(1)).is_file()
    assert op in result.stdout and "verdict:    ok" in result.stdout
    line = f'model_operations {{ op_library_filename: "{output.group(1)}" }}'
    assert result.stdout.splitlines()[-1].startswith(line)


# op sources shipped with a model ------------------------------------------------------------------
def test_a_model_shipping_op_sources_serves(tmp_path: Path, ort_headers: Path) -> None:
    """Built at load (and again after its cached build is removed); a compile error makes the
    model UNAVAILABLE with the compiler's first error."""
    repo = tmp_path / "repository"
    sources = 'parameters {{ key: "OP_LIBRARY_SOURCES" value: {{ string_value: "{}" }} }}\n'
    config = 'backend: "onnxruntime"\nmax_batch_size: 4\n'
    folder = models.write_model(
        repo, "from_sources", models.custom_op(), config + sources.format("ops/my_ops.cc")
    )
    build.copy_to(ORT_SOURCE, folder / "ops" / "my_ops.cc")
    broken = models.write_model(
        repo, "broken_sources", models.custom_op(), config + sources.format("broken.cc")
    )
    (broken / "broken.cc").write_text("this is not C++\n")
    cache = tmp_path / "cache"
    env = {"OPSERVE_CACHE_DIR": str(cache), "ORT_INCLUDE_DIR": str(ort_headers)}
    explicit = ["--model-control-mode", "explicit", "--load-model", "*"]
    with RunningServer([repo], explicit, env=env) as running:
        assert add_one(running.url, "from_sources").tolist() == [[1.0] * 4]
        message = unavailable_reason(running.url, "broken_sources")
        assert "model 'broken_sources': building libbroken.so" in message
        assert f"{broken / 'broken.cc'}:1:1: error:" in message
        built = list((cache / "opserve" / "oplibs").glob("*/libmy_ops.so"))
        assert len(built) == 1
        shutil.rmtree(cache / "opserve" / "oplibs")
        httpclient.InferenceServerClient(running.url).load_model("from_sources")
        assert add_one(running.grpc_url, "from_sources", grpcclient).tolist() == [[1.0] * 4]
        assert [p.name for p in (cache / "opserve" / "oplibs").glob("*/*.so")] == ["libmy_ops.so"]
    assert "op library" in running.log() and "built for onnxruntime" in running.log()


# one framework version per model ------------------------------------------------------------------
def test_two_onnxruntime_versions_serve_side_by_side(tmp_path: Path, ort_headers: Path) -> None:
    """Each model's library is built by `opserve ops build --model` against its own environment's
    onnxruntime; `opserve check` inspects each there; each answers with its runtime's version."""
    repo = tmp_path / "repository"
    environments = {"ort_old": OLD_ORT, "ort_other": OTHER_ORT}
    for name, version in environments.items():
        environment = onnxruntime_environment(version)
        folder = models.write_model(
            repo, name, models.custom_op("RuntimeMinor"), env_config(environment)
        )
        result = opserve(
            "ops", "build", str(ORT_SOURCE), "--model", str(folder),
            env={"ORT_INCLUDE_DIR": str(ort_headers)},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert f"for onnxruntime {version} in {environment}" in result.stdout
        assert f"framework:  onnxruntime (installed: {version})" in result.stdout
        line = result.stdout.splitlines()[-1]
        assert line == 'model_operations { op_library_filename: "libmy_ops.so" }'
        (folder / "config.pbtxt").write_text(env_config(environment) + line + "\n")

    import json

    report = json.loads(opserve("check", "--model-repository", str(repo), "--json").stdout)
    assert report["ok"], report
    for name, version in environments.items():
        library = report["libraries"][str((repo / name / "libmy_ops.so").resolve())]
        assert library["framework_version"] == version

    with RunningServer([repo]) as running:
        for url, protocol in ((running.url, httpclient), (running.grpc_url, grpcclient)):
            assert add_one(url, "ort_old", protocol).tolist() == [[21.0] * 4]
            assert add_one(url, "ort_other", protocol).tolist() == [[23.0] * 4]


def test_an_environment_without_the_framework_is_named(tmp_path: Path) -> None:
    """A PyTorch model whose environment has only onnxruntime: UNAVAILABLE naming what it lacks
    and the install that adds it (checked before anything is loaded)."""
    environment = onnxruntime_environment(OLD_ORT)
    repo = tmp_path / "repository"
    folder = repo / "no_torch"
    (folder / "1").mkdir(parents=True)
    (folder / "1" / "model.pt").write_bytes(b"")
    (folder / "config.pbtxt").write_text(
        env_config(environment).replace('"onnxruntime"', '"pytorch"')
    )
    with RunningServer([repo]) as running:
        message = unavailable_reason(running.url, "no_torch")
    assert "it lacks torch, tritonclient.grpc, which the worker of a 'pytorch' model" in message
    assert "-m pip install torch tritonclient[grpc]" in message
