"""Knowing what a model needs: the custom ops a model file uses (ONNX, TorchScript, TensorFlow),
`opserve check` against the ops its libraries register (with the `model_operations` line to
add), the same hint at load, the config against the model's signature, and ONNX Runtime ops
written in Python (onnxruntime-extensions' `onnx_op`) served from the model's own folder."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx import helper

from opserve.config import model_config_for
from opserve.config.validate import model_mismatches
from opserve.ops.model_probe import ModelJob, probe_models
from opserve.ops.needs import candidate_libraries, missing_op_in, model_operations_line
from opserve.signature import ModelSignature, TensorSpec
from tests import models
from tests.conftest import custom_op_config
from tests.framework_models import framework_model
from tests.frameworks import place, requires
from tests.oplibs import build
from tests.serving import RunningServer

# an op file as a user writes it: one op in Python, served in ONNX Runtime's domain
# `ai.onnx.contrib`
PYTHON_OPS = """
import numpy as np
from onnxruntime_extensions import PyOp, onnx_op


@onnx_op(op_type="Triple", inputs=[PyOp.dt_float], outputs=[PyOp.dt_float])
def triple(x):
    return np.asarray(x, dtype=np.float32) * 3
"""


def python_op_model():
    """OUTPUT0 = ai.onnx.contrib::Triple(INPUT0), FP32 [-1, 4]."""
    return models.custom_op("Triple", "ai.onnx.contrib")


# pure parts ---------------------------------------------------------------------------------------


def test_the_op_a_frameworks_load_error_names() -> None:
    assert (
        missing_op_in(
            "[ONNXRuntimeError] : 1 : FAIL : Fatal error: my_ops:AddOne(-1) is not a "
            "registered function/op"
        )
        == "my_ops::AddOne"
    )
    assert (
        missing_op_in("\nUnknown builtin op: my_ops::add_one.\nCould not find any similar ops")
        == "my_ops::add_one"
    )
    assert missing_op_in("Op type not registered 'ZeroOut' in binary running on h") == "ZeroOut"
    assert missing_op_in("onnxruntime failed to load 'm.onnx': Protobuf parsing failed") is None


def test_the_line_to_add_names_the_library_as_the_model_would(tmp_path: Path) -> None:
    model, version, sibling = tmp_path / "m", tmp_path / "m" / "1", tmp_path / "other"
    for folder in (version, model / "ops", sibling):
        folder.mkdir(parents=True, exist_ok=True)
    for library in (model / "ops" / "liba.so", version / "libb.so", sibling / "libc.so"):
        library.write_bytes(b"")
    assert model_operations_line(model / "ops" / "liba.so", model, version) == (
        'model_operations { op_library_filename: "ops/liba.so" }'
    )
    assert model_operations_line(version / "libb.so", model, version) == (
        'model_operations { op_library_filename: "libb.so" }'
    )
    assert model_operations_line(sibling / "libc.so", model, version) == (
        f'model_operations {{ op_library_filename: "{(sibling / "libc.so").resolve()}" }}'
    )
    (model / "model.py").write_text("import numpy\n")  # a Python model: not an op file
    (model / "my_ops.py").write_text(PYTHON_OPS)
    found = candidate_libraries(model, listed=[version / "libb.so"])
    assert [p.name for p in found] == ["my_ops.py", "liba.so", "libc.so"]


def signature(inputs: list[tuple[str, str, tuple[int, ...]]], outputs=()) -> ModelSignature:  # type: ignore[no-untyped-def]
    return ModelSignature(
        tuple(TensorSpec(*t) for t in inputs), tuple(TensorSpec(*t) for t in outputs)
    )


def onnx_config(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    (tmp_path / "m").mkdir(exist_ok=True)
    (tmp_path / "m" / "config.pbtxt").write_text('backend: "onnxruntime"\n' + text)
    return model_config_for("m", tmp_path / "m")


def test_config_dims_and_types_against_an_onnx_model_in_tritons_words(tmp_path: Path) -> None:
    model = signature([("X", "FP32", (-1, 4))], [("Y", "FP32", (-1, 4))])
    batched = onnx_config(
        tmp_path,
        'max_batch_size: 8\ninput { name: "X" data_type: TYPE_FP32 dims: [ 5 ] }\n'
        'output { name: "Y" data_type: TYPE_INT32 dims: [ 4 ] }\n',
    )
    assert model_mismatches(batched, model) == [
        "model 'm', tensor 'X': the model expects 2 dimensions (shape [-1,4]) but the model "
        "configuration specifies 2 dimensions (an initial batch dimension because max_batch_size "
        "> 0 followed by the explicit tensor shape, making complete shape [-1,5])",
        "unable to load model 'm', configuration expects datatype TYPE_INT32 for output 'Y', "
        "model provides TYPE_FP32",
    ]
    fixed = signature([("X", "FP32", (2, -1))], [("Y", "FP32", (2, -1))])
    unbatched = onnx_config(
        tmp_path,
        'input { name: "X" data_type: TYPE_FP32 dims: [ 2, 7 ] }\n'  # -1 takes any size
        'output { name: "Y" data_type: TYPE_FP32 dims: [ 2, 7 ] }\n',  # outputs: exactly
    )
    assert model_mismatches(unbatched, fixed) == [
        "model 'm', tensor 'Y': the model expects 2 dimensions (shape [2,-1]) but the model "
        "configuration specifies 2 dimensions (shape [2,7])"
    ]
    batched.max_batch_size = 4
    assert model_mismatches(batched, fixed)[0] == (
        "model 'm', tensor 'X': for the model to support batching the shape should have at "
        "least 1 dimension and the first dimension must be -1; but shape expected by the model "
        "is [2,-1]"
    )
    reshaped = onnx_config(
        tmp_path,
        'max_batch_size: 8\ninput { name: "X" data_type: TYPE_FP32 dims: [ 2, 2 ] '
        "reshape { shape: [ 4 ] } }\n",
    )
    assert model_mismatches(reshaped, model) == []
    scalar = onnx_config(tmp_path, 'input { name: "X" data_type: TYPE_FP32 dims: [ 3 ] }\n')
    assert model_mismatches(scalar, signature([("X", "FP32", ())])) == [
        "unable to load model 'm', scalar tensor 'X', should only provide 1 in the model "
        "configuration when the model doesn't support batching. Model configuration provided: "
        "[3]."
    ]


def test_other_backends_are_checked_for_names_only(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.pbtxt").write_text(
        'platform: "tensorflow_savedmodel"\ninput { name: "X" data_type: TYPE_INT32 dims: [ 5 ] }\n'
        'input { name: "Z" data_type: TYPE_INT32 dims: [ 5 ] }\n'
    )
    config = model_config_for("m", tmp_path / "m")
    assert model_mismatches(config, signature([("X", "FP32", (-1, 4))])) == [
        "unexpected inference input 'Z', allowed inputs are: X"
    ]


# what a model file uses, found in a probe ---------------------------------------------------------


def nested_onnx_model():
    """A custom op inside an If's branch and inside a local function; a call of that function
    is no custom op, nor is ONNX Runtime's own com.microsoft op."""
    branch = helper.make_graph(
        [helper.make_node("InBranch", ["INPUT0"], ["B"], domain="branch_ops")],
        "then",
        [],
        [models.tensor("B", "FP32", [None, 4])],
    )
    function = helper.make_function(
        "local",
        "Twice",
        ["x"],
        ["y"],
        [helper.make_node("InFunction", ["x"], ["y"], domain="function_ops")],
        [helper.make_opsetid("", 17), helper.make_opsetid("function_ops", 1)],
    )
    nodes = [
        helper.make_node("ReduceSum", ["INPUT0"], ["S"], keepdims=0),
        helper.make_node("Cast", ["S"], ["C"], to=9),
        helper.make_node("If", ["C"], ["I"], then_branch=branch, else_branch=branch),
        helper.make_node("Twice", ["I"], ["T"], domain="local"),
        helper.make_node("Gelu", ["T"], ["OUTPUT0"], domain="com.microsoft"),
    ]
    graph = helper.make_graph(
        nodes,
        "nested",
        [models.tensor("INPUT0", "FP32", [None, 4])],
        [models.tensor("OUTPUT0", "FP32", [None, 4])],
    )
    opsets = [
        helper.make_opsetid(domain, 1)
        for domain in ("local", "branch_ops", "function_ops", "com.microsoft")
    ]
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), *opsets],
        functions=[function],
        ir_version=8,
    )


def probe_one(tmp_path: Path, name: str, model_file: Path, config: str):  # type: ignore[no-untyped-def]
    """The probe's facts about a model placed in a folder of its own."""
    folder = tmp_path / name
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(config)
    place(model_file, folder / "1" / model_file.name)
    job = ModelJob(model_config_for(name, folder), folder, folder / "1")
    return probe_models([job])[0]


def test_onnx_custom_ops_in_subgraphs_and_functions(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    onnx.save(nested_onnx_model(), str(model))
    facts = probe_one(tmp_path, "nested", model, 'backend: "onnxruntime"\n')
    assert facts.uses == ["branch_ops::InBranch", "function_ops::InFunction"]


@requires("torch")
def test_torchscript_custom_ops_in_submodules_and_methods(tmp_path: Path) -> None:
    library = build.pytorch_my_ops()
    model = framework_model("torch_nested_ops", "model.pt", library)
    facts = probe_one(tmp_path, "nested", model, 'platform: "pytorch_libtorch"\n')
    assert facts.uses == ["my_ops::add_one", "my_ops::custom_modulo"]
    assert "Unknown builtin op: my_ops::" in (facts.error or "")  # nothing registered them


@requires("tensorflow")
def test_tensorflow_op_types_missing_from_tensorflow(tmp_path: Path) -> None:
    """A GraphDef's nodes and a SavedModel's function library (one probe process for both)."""
    library = build.tensorflow_zero_out()
    jobs = []
    for kind, filename, platform in (
        ("tf_zero_out_savedmodel", "model.savedmodel", "tensorflow_savedmodel"),
        ("tf_zero_out_graphdef", "model.graphdef", "tensorflow_graphdef"),
    ):
        folder = tmp_path / kind
        place(framework_model(kind, filename, library), folder / "1" / filename)
        (folder / "config.pbtxt").write_text(f'platform: "{platform}"\n')
        jobs.append(ModelJob(model_config_for(kind, folder), folder, folder / "1"))
    assert [facts.uses for facts in probe_models(jobs)] == [["ZeroOut"], ["ZeroOut"]]


# check and load through a real server ---------------------------------------------------------


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory, my_ops_library: Path) -> Path:
    repo = tmp_path_factory.mktemp("model_ops") / "repository"
    folder = models.write_model(
        repo, "unlisted", models.custom_op(), custom_op_config("unlisted", None)
    )
    build.copy_to(my_ops_library, folder / "ops" / "libmy_ops.so")
    models.write_model(
        repo,
        "unknown_op",
        models.custom_op("Nope", "far_ops"),
        custom_op_config("unknown_op", None),
    )
    folder = models.write_model(
        repo, "python_op", python_op_model(), custom_op_config("python_op", "triple.py")
    )
    (folder / "triple.py").write_text(PYTHON_OPS)
    # the same op in a model that does not list the file: the op lives only in python_op's worker
    models.write_model(
        repo, "python_op_unlisted", python_op_model(), custom_op_config("python_op_unlisted", None)
    )
    models.write_model(
        repo,
        "wrong_dims",
        models.identity("FP32", [None, 16]),
        'max_batch_size: 4\ninput [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 8 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]\n',
    )
    return repo


@pytest.fixture(scope="module")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with RunningServer([repository], log_path=log) as running:
        yield running


def reason(server: RunningServer, model: str) -> str:
    response = requests.get(f"http://{server.url}/v2/models/{model}/ready")
    assert response.status_code == 400
    return str(response.json()["error"])


def fix_line(repository: Path, model: str, library: str) -> str:
    return (
        f"'{repository.resolve() / model / library}' registers op 'my_ops::AddOne' but the model "
        f'does not list it: add model_operations {{ op_library_filename: "{library}" }} to '
        f"'{repository / model / 'config.pbtxt'}'"
    )


def test_check_names_the_missing_op_and_the_line_to_add(repository: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "opserve", "check", "--model-repository", str(repository), "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1, result.stderr
    report = {m["name"]: m for m in json.loads(result.stdout)["models"]}
    assert report["unlisted"]["problems"] == [
        "version 1: the model uses op 'my_ops::AddOne', which neither ONNX Runtime nor the "
        "model's op libraries (its own, --op-library, LD_PRELOAD) provide; "
        + fix_line(repository, "unlisted", "ops/libmy_ops.so")
    ]
    assert report["unknown_op"]["problems"] == [
        "version 1: the model uses op 'far_ops::Nope', which neither ONNX Runtime nor the "
        "model's op libraries (its own, --op-library, LD_PRELOAD) provide"
    ]
    assert report["python_op"]["ok"], report["python_op"]
    (problem,) = report["python_op_unlisted"]["problems"]
    assert "'ai.onnx.contrib::Triple'" in problem
    assert 'model_operations { op_library_filename: "' in problem and "triple.py" in problem
    assert report["wrong_dims"]["problems"] == [
        "version 1: model 'wrong_dims', tensor 'INPUT0': the model expects 2 dimensions (shape "
        "[-1,16]) but the model configuration specifies 2 dimensions (an initial batch dimension "
        "because max_batch_size > 0 followed by the explicit tensor shape, making complete "
        "shape [-1,8])"
    ]


def test_load_adds_the_line_to_onnxruntimes_error(server: RunningServer, repository) -> None:
    text = reason(server, "unlisted")
    assert "my_ops:AddOne(-1) is not a registered function/op" in text  # ONNX Runtime's words
    assert text.endswith(fix_line(repository, "unlisted", "ops/libmy_ops.so"))
    assert "far_ops:Nope(-1) is not a registered function/op" in reason(server, "unknown_op")


def test_load_refuses_dims_that_contradict_the_model(server: RunningServer) -> None:
    assert reason(server, "wrong_dims").endswith(
        "version 1: model 'wrong_dims', tensor 'INPUT0': the model expects 2 dimensions (shape [-1,16]) "
        "but the model configuration specifies 2 dimensions (an initial batch dimension because "
        "max_batch_size > 0 followed by the explicit tensor shape, making complete shape [-1,8])"
    )


def test_a_python_defined_onnx_op_serves_from_its_models_worker_only(
    server: RunningServer,
) -> None:
    data = np.arange(8, dtype=np.float32).reshape(2, 4)
    http = httpclient.InferenceServerClient(server.url)
    tensor = httpclient.InferInput("INPUT0", [2, 4], "FP32")
    tensor.set_data_from_numpy(data)
    np.testing.assert_array_equal(http.infer("python_op", [tensor]).as_numpy("OUTPUT0"), data * 3)
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    tensor = grpcclient.InferInput("INPUT0", [2, 4], "FP32")
    tensor.set_data_from_numpy(data)
    np.testing.assert_array_equal(grpc.infer("python_op", [tensor]).as_numpy("OUTPUT0"), data * 3)
    assert http.get_model_metadata("python_op")["op_libraries"][0].endswith("triple.py")
    # the op was registered in python_op's worker alone
    text = reason(server, "python_op_unlisted")
    assert "ai.onnx.contrib:Triple(-1) is not a registered function/op" in text
    assert "triple.py" in text
