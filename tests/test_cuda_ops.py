"""CUDA custom ops: `opserve ops build` compiles `.cu` sources with nvcc beside the C++ ones, and
a model on a GPU instance serves the op. The serving test needs a CUDA GPU, a CUDA build of
PyTorch and nvcc, and is skipped cleanly without them; the error paths run everywhere."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from opserve.errors import BuildError
from opserve.ops import cuda
from opserve.ops.cuda import architecture_flags, find_nvcc
from tests import framework_models, models
from tests.oplibs import build
from tests.oplibs.build import opserve
from tests.serving import RunningServer

KERNEL = build.SOURCES / "cuda" / "twice_plus_one.cu"
SOURCES = [build.SOURCES / "pytorch" / "cuda_ops.cc", KERNEL]
ORT_SOURCES = [build.SOURCES / "onnxruntime" / "cuda_ops.cc", KERNEL]


def has_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60)
    return listed.returncode == 0 and "GPU" in listed.stdout


def why_no_nvcc() -> str | None:
    try:
        find_nvcc()
    except BuildError as exc:
        return exc.message
    return None


def why_no_cuda() -> str | None:
    """Why this machine cannot build and serve a CUDA op (None: it can)."""
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    if not has_gpu():
        return "no NVIDIA GPU (nvidia-smi lists none)"
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    return why_no_nvcc()


def config(kind: str, operations: str) -> str:
    return (
        'backend: "pytorch"\nmax_batch_size: 4\n'
        'input { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 4 ] }\n'
        'output { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 4 ] }\n'
        f"instance_group {{ kind: {kind} count: 1 }}\n{operations}"
    )


def infer(url: str, model: str, x: np.ndarray, protocol=httpclient) -> np.ndarray:
    client = protocol.InferenceServerClient(url)
    tensor = protocol.InferInput("INPUT__0", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer(model, [tensor]).as_numpy("OUTPUT__0")


# pure rules ---------------------------------------------------------------------------------------
def test_architectures_come_from_cudaarchs() -> None:
    assert architecture_flags({}) == []
    assert architecture_flags({"CUDAARCHS": "native"}) == ["-arch=native"]
    assert architecture_flags({"CUDAARCHS": "80;sm_90a"}) == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_90a,code=compute_90a",
    ]
    with pytest.raises(BuildError, match="CUDAARCHS=ampere is not a list of GPU architectures"):
        architecture_flags({"CUDAARCHS": "ampere"})


def test_nvcc_is_looked_for_where_cuda_lives(tmp_path: Path) -> None:
    home = tmp_path / "cuda-13.0"
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (home / "bin" / "nvcc").chmod(0o755)
    assert find_nvcc({"CUDA_HOME": str(home), "PATH": ""}, site_dirs=[]) == home / "bin" / "nvcc"
    assert find_nvcc({"PATH": ""}, hint=str(home), site_dirs=[]) == home / "bin" / "nvcc"
    wheel = tmp_path / "site" / "nvidia" / "cu13" / "bin"
    wheel.mkdir(parents=True)
    shutil.copy(home / "bin" / "nvcc", wheel / "nvcc")
    assert find_nvcc({"PATH": ""}, site_dirs=[str(tmp_path / "site")]) == wheel / "nvcc"
    with pytest.raises(BuildError, match="NVCC=/nowhere/nvcc names no CUDA compiler"):
        find_nvcc({"NVCC": "/nowhere/nvcc"})


# error paths, on any machine ----------------------------------------------------------------------
def test_no_nvcc_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda, "SYSTEM_TOOLKIT", tmp_path / "no-cuda")
    with pytest.raises(BuildError) as raised:
        find_nvcc({"PATH": str(tmp_path)}, site_dirs=[])
    message = raised.value.message
    assert "CUDA sources need CUDA's compiler nvcc, which was not found" in message
    assert "install the CUDA toolkit" in message and "CUDA_HOME" in message


def test_cuda_sources_need_a_cuda_build_of_pytorch(tmp_path: Path) -> None:
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    import torch

    if torch.version.cuda is not None:
        pytest.skip(f"torch {torch.__version__} is built with CUDA")
    result = opserve("ops", "build", *map(str, SOURCES), "--framework", "pytorch", cwd=tmp_path)
    assert result.returncode == 2
    assert f"torch {torch.__version__} is CPU-only" in result.stderr
    assert "CUDA sources need a CUDA build of PyTorch" in result.stderr
    assert not list(tmp_path.glob("*.so"))


# ONNX Runtime: built wherever nvcc is, served on a GPU ----------------------------------------------
@pytest.mark.skipif(why_no_nvcc() is not None, reason=str(why_no_nvcc()))
def test_an_onnxruntime_cuda_op_builds_and_answers(tmp_path: Path) -> None:
    """nvcc compiles the kernel, g++ the op, both link against CUDA's runtime (found at run time
    by the library's own rpath); with a GPU the model answers 2x+1, without one the op's CUDA
    error reaches the client in the protocol's format and the server stays up."""
    ort_headers = build.onnxruntime_headers()
    repo = tmp_path / "repository"
    folder = repo / "ort_cuda"
    (folder / "1").mkdir(parents=True)
    result = opserve(
        "ops", "build", *map(str, ORT_SOURCES), "--framework", "onnxruntime",
        "-o", "libcuda_ops.so", env={"ORT_INCLUDE_DIR": str(ort_headers)}, cwd=folder,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "cuda_ops::TwicePlusOne" in result.stdout and "verdict:    ok" in result.stdout
    assert re.search(r"libcudart\.so\.\d+ => /", result.stdout), result.stdout
    line = result.stdout.splitlines()[-1].split("  #")[0]
    models.write_model(
        repo, "ort_cuda", models.custom_op("TwicePlusOne", "cuda_ops"),
        f'backend: "onnxruntime"\nmax_batch_size: 4\n{line}\n',
    )  # fmt: skip
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    tensor = httpclient.InferInput("INPUT0", [2, 4], "FP32")
    tensor.set_data_from_numpy(x)
    with RunningServer([repo]) as running:
        client = httpclient.InferenceServerClient(running.url)
        if has_gpu():
            assert (
                client.infer("ort_cuda", [tensor]).as_numpy("OUTPUT0").tolist()
                == (2 * x + 1).tolist()
            )
        else:
            with pytest.raises(InferenceServerException, match="TwicePlusOne: cudaMalloc: "):
                client.infer("ort_cuda", [tensor])
        assert client.is_model_ready("ort_cuda")


# PyTorch, on a GPU --------------------------------------------------------------------------------
@pytest.mark.skipif(why_no_cuda() is not None, reason=str(why_no_cuda()))
def test_a_cuda_op_builds_and_serves_on_the_gpu(tmp_path: Path) -> None:
    """Built by `opserve ops build` (one .cc and one .cu), and from the sources a model ships;
    both serve on a GPU instance over HTTP and gRPC; on a CPU instance the op has no kernel."""
    repo = tmp_path / "repository"
    prebuilt = repo / "cuda_prebuilt"
    (prebuilt / "1").mkdir(parents=True)
    result = opserve(
        "ops", "build", *map(str, SOURCES), "--framework", "pytorch", "-o", "libcuda_ops.so",
        cwd=prebuilt,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "cuda_ops::twice_plus_one" in result.stdout and "verdict:    ok" in result.stdout
    line = result.stdout.splitlines()[-1]
    assert line.startswith('model_operations { op_library_filename: "libcuda_ops.so" }')
    model = framework_models.framework_model(
        "torch_twice_plus_one", "model.pt", prebuilt / "libcuda_ops.so"
    )
    shutil.copy(model, prebuilt / "1" / "model.pt")
    (prebuilt / "config.pbtxt").write_text(config("KIND_GPU", line + "\n"))

    sources = repo / "cuda_sources"
    (sources / "1").mkdir(parents=True)
    shutil.copy(model, sources / "1" / "model.pt")
    for source in SOURCES:
        build.copy_to(source, sources / "ops" / source.name)
    listed = ", ".join(f"ops/{s.name}" for s in SOURCES)
    parameter = (
        f'parameters {{ key: "OP_LIBRARY_SOURCES" value: {{ string_value: "{listed}" }} }}\n'
    )
    (sources / "config.pbtxt").write_text(config("KIND_GPU", parameter))

    on_cpu = repo / "cuda_op_on_cpu"
    (on_cpu / "1").mkdir(parents=True)
    shutil.copy(model, on_cpu / "1" / "model.pt")
    shutil.copy(prebuilt / "libcuda_ops.so", on_cpu / "libcuda_ops.so")
    (on_cpu / "config.pbtxt").write_text(config("KIND_CPU", line + "\n"))

    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    env = {"OPSERVE_CACHE_DIR": str(tmp_path / "cache")}
    with RunningServer([repo], env=env) as running:
        for name in ("cuda_prebuilt", "cuda_sources"):
            assert infer(running.url, name, x).tolist() == (2 * x + 1).tolist()
            answer = infer(running.grpc_url, name, x, grpcclient)
            assert answer.tolist() == (2 * x + 1).tolist()
        with pytest.raises(InferenceServerException, match="'CPU' backend"):
            infer(running.url, "cuda_op_on_cpu", x)
    built = list((tmp_path / "cache" / "opserve" / "oplibs").glob("*/libcuda_ops.so"))
    assert len(built) == 1
