"""Shared fixtures: the test model repository, real servers, and the custom-op library builds."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from onnx import helper, numpy_helper

from tests import models
from tests.oplibs import build
from tests.serving import RunningServer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "model_repository"


@pytest.fixture(scope="session")
def my_ops_library() -> Path:
    """Our own ONNX Runtime custom-op library (AddOne adds 1), compiled from C++ (cached)."""
    return build.onnxruntime_my_ops(add_value=1.0)


def add_constant(value: float):
    """OUTPUT0 = INPUT0 + value, FP32 [-1, 4]: tells versions apart."""
    constant = numpy_helper.from_array(np.array([value], dtype=np.float32), "C")
    graph = helper.make_graph(
        [helper.make_node("Add", ["INPUT0", "C"], ["OUTPUT0"])],
        "graph",
        [models.tensor("INPUT0", "FP32", [None, 4])],
        [models.tensor("OUTPUT0", "FP32", [None, 4])],
        initializer=[constant],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def optional_bias():
    """OUTPUT0 = INPUT0 + BIAS, where BIAS is an optional input that defaults to [10, 20]."""
    bias = numpy_helper.from_array(np.array([10, 20], dtype=np.float32), "BIAS")
    graph = helper.make_graph(
        [helper.make_node("Add", ["INPUT0", "BIAS"], ["OUTPUT0"])],
        "graph",
        [models.tensor("INPUT0", "FP32", [2]), models.tensor("BIAS", "FP32", [2])],
        [models.tensor("OUTPUT0", "FP32", [2])],
        initializer=[bias],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


SIMPLE_CONFIG = """
name: "simple"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
        { name: "INPUT1" data_type: TYPE_INT32 dims: [ 16 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
         { name: "OUTPUT1" data_type: TYPE_INT32 dims: [ 16 ] } ]
"""

ALL_TYPES_CONFIG = 'backend: "onnxruntime"\nmax_batch_size: 0\n' + "".join(
    f'input {{ name: "IN_{t}" data_type: TYPE_{"STRING" if t == "BYTES" else t} dims: [ -1 ] }}\n'
    f'output {{ name: "OUT_{t}" data_type: TYPE_{"STRING" if t == "BYTES" else t} dims: [ -1 ] }}\n'
    for t in models.ONNX_TYPES
)


def custom_op_config(name: str, library: str | None) -> str:
    ops = f'model_operations {{ op_library_filename: "{library}" }}\n' if library else ""
    return f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: 4\n{ops}'


def write_test_repository(root: Path, my_ops: Path) -> Path:
    repo = root / "repository"
    models.write_model(repo, "simple", models.add_sub(), SIMPLE_CONFIG)
    models.write_model(repo, "all_types", models.all_types_identity(), ALL_TYPES_CONFIG)
    models.write_model(
        repo,
        "optional_input",
        optional_bias(),
        'max_batch_size: 0\ninput [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 2 ] },\n'
        '  { name: "BIAS" data_type: TYPE_FP32 dims: [ 2 ] optional: true } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 2 ] } ]\n',
    )
    models.write_model(repo, "no_config", models.identity("FP32", [None, 16]))
    models.write_model(
        repo, "partial_config", models.identity("FP32", [None, 16]), "max_batch_size: 2\n"
    )
    models.write_model(
        repo,
        "vector_fp32",
        models.identity("FP32", [None]),
        'max_batch_size: 0\ninput [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]\n',
    )
    models.write_model(repo, "vector_batch", models.identity("FP32", [None]))
    models.write_model(
        repo,
        "batched_vectors",
        models.identity("FP32", [None, None]),
        'max_batch_size: 8\ninput [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]\n',
    )
    models.write_model(repo, "fp16_matrix", models.identity("FP16", [2, 3]))
    # version policies; each version adds its own number, so answers tell versions apart
    for name, policy, versions in (
        ("policy_latest2", "version_policy: { latest: { num_versions: 2 } }", (1, 2, 3)),
        ("policy_all", "version_policy: { all: {} }", (1, 2)),
        ("policy_specific", "version_policy: { specific: { versions: [1, 3] } }", (1, 2, 3)),
        ("policy_default", "", (1, 2, 3, 10)),
    ):
        for version in versions:
            models.write_model(
                repo,
                name,
                add_constant(float(version)),
                f'backend: "onnxruntime"\n{policy}\n',
                versions=(version,),
            )
    for ignored in ("0011", "abc"):  # a leading zero and a non-number: not versions
        models.write_model(repo, "policy_default", add_constant(1000.0), versions=(ignored,))
    # model.onnx may be a folder holding model.onnx (with its external data), as in Triton
    models.write_model(
        repo,
        "onnx_folder",
        add_constant(6.0),
        'backend: "onnxruntime"\n',
        filename="model.onnx/model.onnx",
    )
    models.write_model(
        repo,
        "custom_filename",
        add_constant(5.0),
        'backend: "onnxruntime"\ndefault_model_filename: "my_model.onnx"\n',
        filename="my_model.onnx",
    )
    # custom ops: library in the model's folder, in the version folder, missing, not given
    folder = models.write_model(
        repo,
        "ops_in_model_dir",
        models.custom_op(),
        custom_op_config("ops_in_model_dir", "libmy_ops.so"),
    )
    build.copy_to(my_ops, folder / "libmy_ops.so")
    folder = models.write_model(
        repo,
        "ops_in_version_dir",
        models.custom_op(),
        custom_op_config("ops_in_version_dir", "libmy_ops.so"),
    )
    build.copy_to(my_ops, folder / "1" / "libmy_ops.so")
    models.write_model(
        repo,
        "ops_missing_library",
        models.custom_op(),
        custom_op_config("ops_missing_library", "libnot_there.so"),
    )
    models.write_model(
        repo, "ops_not_registered", models.custom_op(), custom_op_config("ops_not_registered", None)
    )
    # the classification extension: labels from the output's label_filename (the second
    # line left empty: that class has no label)
    folder = models.write_model(
        repo,
        "classifier",
        models.identity("FP32", [None, 4]),
        'max_batch_size: 4\ninput [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] '
        'label_filename: "labels.txt" } ]\n',
    )
    (folder / "labels.txt").write_text("cat\n\nbird\nfish\n")
    models.write_model(
        repo,
        "labels_missing",
        models.identity("FP32", [None, 4]),
        'max_batch_size: 4\ninput [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] '
        'label_filename: "nowhere.txt" } ]\n',
    )
    models.write_model(
        repo,
        "small_ints",
        models.small_ints_identity(),
        "max_batch_size: 0\n"
        + "".join(
            f'input {{ name: "IN_{t}" data_type: TYPE_{t} dims: [ -1 ] }}\n'
            f'output {{ name: "OUT_{t}" data_type: TYPE_{t} dims: [ -1 ] }}\n'
            for t in ("INT8", "INT16", "UINT8", "UINT16")
        ),
    )
    # broken configurations
    models.write_model(
        repo,
        "bad_syntax",
        models.identity(),
        'name: "bad_syntax"\nmax_batch_size: 4\ninput [ { name: "X" \n',
    )
    models.write_model(repo, "wrong_name", models.identity(), 'name: "another_name"\n')
    # a version folder with a name that is not a number
    models.write_model(repo, "no_versions", None, 'backend: "onnxruntime"\n', versions=("v1",))
    models.write_model(
        repo, "misnamed_file", models.identity(), 'backend: "onnxruntime"\n', filename="my.onnx"
    )
    models.write_model(repo, "platform_typo", models.identity(), 'platform: "onnxruntime_onx"\n')
    models.write_model(repo, "backend_typo", models.identity(), 'backend: "onxruntime"\n')
    models.write_model(
        repo, "policy_missing", models.identity(), "version_policy { specific { versions: [3] } }\n"
    )
    models.write_model(
        repo,
        "unknown_tensor",
        models.identity(),
        'max_batch_size: 4\ninput [ { name: "NOPE" data_type: TYPE_FP32 dims: [16] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [16] } ]\n',
    )
    # config fields: one refused (no GPU instances for onnxruntime), one ignored with a warning
    models.write_model(
        repo, "gpu_instance", models.identity(), "instance_group [ { kind: KIND_GPU } ]\n"
    )
    models.write_model(
        repo,
        "pinned_memory",
        models.identity(),
        "optimization { input_pinned_memory { enable: true } }\n",
    )
    return repo


@pytest.fixture(scope="session")
def test_repository(tmp_path_factory: pytest.TempPathFactory, my_ops_library: Path) -> Path:
    return write_test_repository(tmp_path_factory.mktemp("models"), my_ops_library)


@pytest.fixture(scope="session")
def server(
    test_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with RunningServer([test_repository], log_path=log) as running:
        yield running


@pytest.fixture(scope="session")
def client(server: RunningServer) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(server.url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def example_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of examples/model_repository, prepared as the README's first command prepares it."""
    target = tmp_path_factory.mktemp("examples") / "model_repository"
    shutil.copytree(EXAMPLES, target, ignore=shutil.ignore_patterns("*.so"))
    from onnxruntime_extensions import get_library_path

    shutil.copyfile(get_library_path(), target / "text_ops" / "libortextensions.so")
    return target


@pytest.fixture(scope="session")
def example_server(
    example_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    log = tmp_path_factory.mktemp("logs") / "examples.log"
    with RunningServer([example_repository], log_path=log) as running:
        yield running


def pytest_collection_finish(session: pytest.Session) -> None:
    """A run of the whole suite (not of a test or two) starts its slowest op builds in the
    background at once (`build.prebuild_in_background`)."""
    if len(session.items) > 200:
        build.prebuild_in_background()
