"""The TensorFlow backend: SavedModel and GraphDef, with ZeroOut per model, server-wide and preloaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient

from opserve.ops import framework_library_dir
from tests.clients import infer_input
from tests.framework_models import framework_model
from tests.frameworks import place, requires
from tests.oplibs import build
from tests.serving import RunningServer, mapped

pytestmark = requires("tensorflow")

GRAPHDEF_CONFIG = """
name: "{name}"
platform: "tensorflow_graphdef"
max_batch_size: 4
input [ {{ name: "INPUT0" data_type: TYPE_INT32 dims: [ 4 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 4 ] }} ]
{ops}
"""


def ops(library: str | None) -> str:
    return f'model_operations {{ op_library_filename: "{library}" }}' if library else ""


@pytest.fixture(scope="module")
def zero_out_library() -> Path:
    return build.tensorflow_zero_out()


@pytest.fixture(scope="module")
def savedmodel(zero_out_library: Path) -> Path:
    return framework_model("tf_zero_out_savedmodel", "model.savedmodel", zero_out_library)


@pytest.fixture(scope="module")
def graphdef(zero_out_library: Path) -> Path:
    return framework_model("tf_zero_out_graphdef", "model.graphdef", zero_out_library)


def write(repo: Path, name: str, model: Path, config: str | None) -> Path:
    folder = repo / name
    place(model, folder / "1" / model.name)
    if config is not None:
        (folder / "config.pbtxt").write_text(config)
    return folder


@pytest.fixture(scope="module")
def tf_server(tmp_path_factory, zero_out_library: Path, savedmodel: Path, graphdef: Path):
    repo = tmp_path_factory.mktemp("tf") / "repository"
    folder = write(
        repo,
        "zero_out_savedmodel",
        savedmodel,
        f'platform: "tensorflow_savedmodel"\n{ops("libzero_out.so")}',
    )
    build.copy_to(zero_out_library, folder / "libzero_out.so")
    folder = write(
        repo,
        "zero_out_graphdef",
        graphdef,
        GRAPHDEF_CONFIG.format(name="zero_out_graphdef", ops=ops("libzero_out.so")),
    )
    build.copy_to(zero_out_library, folder / "1" / "libzero_out.so")  # in the version folder
    write(repo, "zero_out_missing_op", savedmodel, 'platform: "tensorflow_savedmodel"\n')
    add_sub = framework_model("tf_add_sub_savedmodel", "model.savedmodel")
    write(repo, "add_sub", add_sub, None)  # no config.pbtxt at all
    signature = 'parameters: {{ key: "TF_SIGNATURE_DEF" value: {{ string_value: "{}" }} }}\n'
    write(repo, "scaled", add_sub, signature.format("scaled"))
    write(repo, "upper", add_sub, signature.format("upper"))
    with RunningServer([repo], log_path=repo.parent / "server.log") as server:
        yield server


def zero_out(client: httpclient.InferenceServerClient, model: str, name: str, output: str) -> None:
    data = np.array([[5, 6, 7, 8], [9, 10, 11, 12]], dtype=np.int32)
    result = client.infer(model, [infer_input(name, data, "INT32")])
    assert result.as_numpy(output).tolist() == [[5, 0, 0, 0], [0, 0, 0, 0]]


def test_zero_out_in_a_savedmodel(tf_server: RunningServer) -> None:
    zero_out(
        httpclient.InferenceServerClient(tf_server.url), "zero_out_savedmodel", "to_zero", "zeroed"
    )


def test_zero_out_in_a_graphdef(tf_server: RunningServer) -> None:
    zero_out(
        httpclient.InferenceServerClient(tf_server.url), "zero_out_graphdef", "INPUT0", "OUTPUT0"
    )


def test_savedmodel_autocomplete(tf_server: RunningServer) -> None:
    client = httpclient.InferenceServerClient(tf_server.url)
    config = client.get_model_config("add_sub")
    assert config["platform"] == "tensorflow_savedmodel" and config["backend"] == "tensorflow"
    assert config["max_batch_size"] == 4
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["input"]] == [
        ("a", "TYPE_FP32", [4]),
        ("b", "TYPE_FP32", [4]),
    ]
    assert sorted(t["name"] for t in config["output"]) == ["difference", "sum"]
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.ones((2, 4), dtype=np.float32)
    result = client.infer("add_sub", [infer_input("a", a, "FP32"), infer_input("b", b, "FP32")])
    np.testing.assert_array_equal(result.as_numpy("sum"), a + b)
    np.testing.assert_array_equal(result.as_numpy("difference"), a - b)


def test_signature_named_in_the_config(tf_server: RunningServer) -> None:
    client = httpclient.InferenceServerClient(tf_server.url)
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    result = client.infer("scaled", [infer_input("x", x, "FP32")])
    np.testing.assert_array_equal(result.as_numpy("y"), x * 10)


def test_string_tensors(tf_server: RunningServer) -> None:
    client = httpclient.InferenceServerClient(tf_server.url)
    config = client.get_model_config("upper")
    assert config["input"][0]["dims"] == [1] and config["input"][0]["reshape"] == {"shape": []}
    text = np.array([[b"zero"], [b"out"]], dtype=np.object_)
    result = client.infer("upper", [infer_input("text", text, "BYTES")])
    assert result.as_numpy("upper").tolist() == [[b"ZERO"], [b"OUT"]]


def test_missing_op_is_unavailable_with_a_hint(tf_server: RunningServer) -> None:
    response = requests.get(f"http://{tf_server.url}/v2/models/zero_out_missing_op/ready")
    assert response.status_code == 400
    reason = response.json()["error"]
    assert "ZeroOut" in reason and "model_operations" in reason
    assert httpclient.InferenceServerClient(tf_server.url).is_model_ready("zero_out_savedmodel")


@pytest.fixture(scope="module")
def plain_tf_repository(tmp_path_factory, savedmodel: Path, graphdef: Path) -> Path:
    repo = tmp_path_factory.mktemp("tf_plain") / "repository"
    write(repo, "zero_out_savedmodel", savedmodel, 'platform: "tensorflow_savedmodel"\n')
    write(
        repo,
        "zero_out_graphdef",
        graphdef,
        GRAPHDEF_CONFIG.format(name="zero_out_graphdef", ops=""),
    )
    return repo


def test_server_wide_op_library(
    plain_tf_repository: Path, zero_out_library: Path, tmp_path: Path
) -> None:
    with RunningServer(
        [plain_tf_repository], ["--op-library", str(zero_out_library)], log_path=tmp_path / "log"
    ) as server:
        client = httpclient.InferenceServerClient(server.url)
        zero_out(client, "zero_out_savedmodel", "to_zero", "zeroed")
        zero_out(client, "zero_out_graphdef", "INPUT0", "OUTPUT0")


def test_ld_preload(plain_tf_repository: Path, zero_out_library: Path, tmp_path: Path) -> None:
    # as Triton documents it: the op library's libtensorflow_framework must be on the library path
    env = {
        "LD_PRELOAD": str(zero_out_library),
        "LD_LIBRARY_PATH": str(framework_library_dir("tensorflow")),
    }
    with RunningServer([plain_tf_repository], env=env, log_path=tmp_path / "log") as server:
        client = httpclient.InferenceServerClient(server.url)
        zero_out(client, "zero_out_savedmodel", "to_zero", "zeroed")
        zero_out(client, "zero_out_graphdef", "INPUT0", "OUTPUT0")
        assert not mapped(server.process.pid, "libtensorflow_framework")
