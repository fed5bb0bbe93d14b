"""The PyTorch (TorchScript) backend, with custom ops per model, server-wide and by LD_PRELOAD."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from opserve.ops import framework_library_dir
from tests.clients import infer_input
from tests.framework_models import framework_model
from tests.frameworks import place, requires
from tests.oplibs import build
from tests.serving import RunningServer, mapped

pytestmark = requires("torch")

MODULO_CONFIG = """
name: "{name}"
platform: "pytorch_libtorch"
max_batch_size: 0
input [ {{ name: "INPUT__0" data_type: TYPE_FP32 dims: [ -1 ] }},
        {{ name: "INPUT__1" data_type: TYPE_FP32 dims: [ -1 ] }} ]
output [ {{ name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ -1 ] }} ]
{ops}
"""

ADD_SUB_CONFIG = """
name: "torch_add_sub"
backend: "pytorch"
max_batch_size: 8
input [ { name: "a" data_type: TYPE_FP32 dims: [ 4 ] },
        { name: "b" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "DIFFERENCE__1" data_type: TYPE_FP32 dims: [ 4 ] },
         { name: "SUM__0" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""


STRINGS_CONFIG = """
backend: "pytorch"
max_batch_size: 4
input [ { name: "WORDS__0" data_type: TYPE_STRING dims: [ 1 ] reshape { shape: [ ] } } ]
output [ { name: "UPPER__0" data_type: TYPE_STRING dims: [ 1 ] reshape { shape: [ ] } },
         { name: "LENGTH__1" data_type: TYPE_INT64 dims: [ 1 ] reshape { shape: [ ] } } ]
"""

# names that are neither forward's arguments (a, b) nor <name>__<index>: the config's order
STRICT_ORDER_CONFIG = """
backend: "pytorch"
max_batch_size: 0
input [ { name: "first" data_type: TYPE_FP32 dims: [ 4 ] },
        { name: "second" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "sum" data_type: TYPE_FP32 dims: [ 4 ] },
         { name: "difference" data_type: TYPE_INT32 dims: [ 4 ] } ]
"""

DICT_INPUT_CONFIG = """
backend: "pytorch"
max_batch_size: 0
input [ { name: "subtrahend" data_type: TYPE_FP32 dims: [ 2 ] },
        { name: "minuend" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 2 ] } ]
"""

TOO_FEW_INPUTS_CONFIG = """
backend: "pytorch"
max_batch_size: 0
input [ { name: "a" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""

BF16_CONFIG = """
platform: "pytorch_libtorch"
input [ { name: "INPUT__0" data_type: TYPE_BF16 dims: [ 4 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_BF16 dims: [ 4 ] } ]
"""


def modulo_config(name: str, library: str | None) -> str:
    ops = f'model_operations {{ op_library_filename: "{library}" }}' if library else ""
    return MODULO_CONFIG.format(name=name, ops=ops)


@pytest.fixture(scope="module")
def torch_ops() -> Path:
    return build.pytorch_my_ops()


@pytest.fixture(scope="module")
def modulo_model(torch_ops: Path) -> Path:
    return framework_model("torch_modulo", "model.pt", torch_ops)


def write(repo: Path, name: str, config: str, model: Path) -> Path:
    folder = repo / name
    place(model, folder / "1" / "model.pt")
    (folder / "config.pbtxt").write_text(config)
    return folder


@pytest.fixture(scope="module")
def torch_server(tmp_path_factory, torch_ops: Path, modulo_model: Path):
    repo = tmp_path_factory.mktemp("torch") / "repository"
    folder = write(
        repo, "torch_modulo", modulo_config("torch_modulo", "libmy_torch_ops.so"), modulo_model
    )
    build.copy_to(torch_ops, folder / "libmy_torch_ops.so")
    write(repo, "torch_missing_op", modulo_config("torch_missing_op", None), modulo_model)
    write(repo, "torch_add_sub", ADD_SUB_CONFIG, framework_model("torch_add_sub", "model.pt"))
    write(repo, "torch_bf16", BF16_CONFIG, framework_model("torch_double", "model.pt"))
    add_sub = framework_model("torch_add_sub", "model.pt")
    write(repo, "torch_strings", STRINGS_CONFIG, framework_model("torch_strings", "model.pt"))
    write(repo, "torch_strict_order", STRICT_ORDER_CONFIG, add_sub)
    write(
        repo, "torch_dict_input", DICT_INPUT_CONFIG, framework_model("torch_dict_input", "model.pt")
    )
    write(repo, "torch_too_few_inputs", TOO_FEW_INPUTS_CONFIG, add_sub)
    with RunningServer([repo], log_path=repo.parent / "server.log") as server:
        yield server


def modulo(client: httpclient.InferenceServerClient, model: str) -> np.ndarray:
    a = np.array([5.0, 7.5, -7.0, 9.0], dtype=np.float32)
    b = np.array([3.0, 2.0, 3.0, 9.5], dtype=np.float32)
    result = client.infer(
        model, [infer_input("INPUT__0", a, "FP32"), infer_input("INPUT__1", b, "FP32")]
    )
    np.testing.assert_allclose(result.as_numpy("OUTPUT__0"), np.fmod(a, b))
    return result.as_numpy("OUTPUT__0")


def test_custom_op_from_the_model_folder(torch_server: RunningServer) -> None:
    modulo(httpclient.InferenceServerClient(torch_server.url), "torch_modulo")


def test_inputs_by_argument_name_and_indexed_outputs(torch_server: RunningServer) -> None:
    client = httpclient.InferenceServerClient(torch_server.url)
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.full((2, 4), 2.0, dtype=np.float32)
    result = client.infer(
        "torch_add_sub", [infer_input("a", a, "FP32"), infer_input("b", b, "FP32")]
    )
    np.testing.assert_array_equal(result.as_numpy("SUM__0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("DIFFERENCE__1"), a - b)
    only = client.infer(
        "torch_add_sub",
        [infer_input("a", a, "FP32"), infer_input("b", b, "FP32")],
        outputs=[httpclient.InferRequestedOutput("DIFFERENCE__1")],
    )
    np.testing.assert_array_equal(only.as_numpy("DIFFERENCE__1"), a - b)


def test_missing_op_is_unavailable_with_a_hint(torch_server: RunningServer) -> None:
    response = requests.get(f"http://{torch_server.url}/v2/models/torch_missing_op/ready")
    assert response.status_code == 400
    reason = response.json()["error"]
    assert "my_ops::custom_modulo" in reason  # PyTorch's own message
    assert "model_operations" in reason  # and the hint
    assert httpclient.InferenceServerClient(torch_server.url).is_model_ready("torch_modulo")


def test_an_inference_error_does_not_take_the_model_down(torch_server: RunningServer) -> None:
    client = httpclient.InferenceServerClient(torch_server.url)
    a = np.ones(4, dtype=np.float32)
    b = np.ones(3, dtype=np.float32)  # shapes that fmod cannot broadcast
    with pytest.raises(InferenceServerException) as raised:
        client.infer(
            "torch_modulo", [infer_input("INPUT__0", a, "FP32"), infer_input("INPUT__1", b, "FP32")]
        )
    assert raised.value.status() == "500"
    assert "PyTorch failed to run model 'torch_modulo'" in raised.value.message()
    modulo(client, "torch_modulo")


@pytest.fixture(scope="module")
def plain_torch_repository(tmp_path_factory, modulo_model: Path) -> Path:
    repo = tmp_path_factory.mktemp("torch_plain") / "repository"
    write(repo, "torch_modulo", modulo_config("torch_modulo", None), modulo_model)
    return repo


def test_server_wide_op_library(
    plain_torch_repository: Path, torch_ops: Path, tmp_path: Path
) -> None:
    with RunningServer(
        [plain_torch_repository], ["--op-library", str(torch_ops)], log_path=tmp_path / "log"
    ) as server:
        modulo(httpclient.InferenceServerClient(server.url), "torch_modulo")


def test_ld_preload(plain_torch_repository: Path, torch_ops: Path, tmp_path: Path) -> None:
    # as Triton documents it: the op library's libtorch must be on the library path
    env = {"LD_PRELOAD": str(torch_ops), "LD_LIBRARY_PATH": str(framework_library_dir("pytorch"))}
    with RunningServer([plain_torch_repository], env=env, log_path=tmp_path / "log") as server:
        modulo(httpclient.InferenceServerClient(server.url), "torch_modulo")
        # the server process itself stays free of libtorch: only the worker preloads it
        assert not mapped(server.process.pid, "libtorch")


def test_bf16_over_grpc(torch_server: RunningServer) -> None:
    import ml_dtypes
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(torch_server.grpc_url)
    values = np.array([1.5, -2.0, 0.25, 3.0], dtype=ml_dtypes.bfloat16)
    tensor = grpcclient.InferInput("INPUT__0", [4], "BF16")
    tensor.set_data_from_numpy(values)
    result = client.infer("torch_bf16", [tensor])
    assert result.get_response().outputs[0].datatype == "BF16"
    assert result.as_numpy("OUTPUT__0").astype(np.float32).tolist() == [3.0, -4.0, 0.5, 6.0]


def test_strings_in_and_out_as_lists(torch_server: RunningServer) -> None:
    """Triton's PyTorch backend passes a BYTES input as a List[str] and returns a List[str]
    result as BYTES (pytorch_backend `SetInputTensors`, `ReadOutputTensors`)."""
    client = httpclient.InferenceServerClient(torch_server.url)
    words = np.array([[b"tea"], [b"caf\xc3\xa9"], [b""]], dtype=np.object_)
    result = client.infer("torch_strings", [infer_input("WORDS__0", words, "BYTES")])
    # TorchScript's str is C++'s std::string: upper case for ASCII, a length in bytes
    assert result.as_numpy("UPPER__0").tolist() == [[b"TEA"], [b"CAF\xc3\xa9"], [b""]]
    assert result.as_numpy("LENGTH__1").tolist() == [[3], [5], [0]]
    assert result.get_output("UPPER__0")["datatype"] == "BYTES"


def test_input_and_output_names_in_config_order(torch_server: RunningServer) -> None:
    """Names that follow neither rule are taken in the config's order (pytorch_backend
    `GetNamingConvention`: strict config ordering); an output of another type than the config's
    is refused with Triton's words (`ReadOutputTensors`)."""
    client = httpclient.InferenceServerClient(torch_server.url)
    first = np.arange(4, dtype=np.float32)
    second = np.full(4, 10.0, dtype=np.float32)
    inputs = [infer_input("second", second, "FP32"), infer_input("first", first, "FP32")]
    result = client.infer(
        "torch_strict_order", inputs, outputs=[httpclient.InferRequestedOutput("sum")]
    )
    np.testing.assert_array_equal(result.as_numpy("sum"), first + second)
    with pytest.raises(InferenceServerException) as raised:
        client.infer(
            "torch_strict_order", inputs, outputs=[httpclient.InferRequestedOutput("difference")]
        )
    assert (
        "configuration expects datatype TYPE_INT32 for output 'difference', model provides "
        "TYPE_FP32" in raised.value.message()
    )


def test_dict_input_gets_inputs_by_name(torch_server: RunningServer) -> None:
    client = httpclient.InferenceServerClient(torch_server.url)
    minuend = np.array([5.0, 1.0], dtype=np.float32)
    subtrahend = np.array([2.0, 3.0], dtype=np.float32)
    result = client.infer(
        "torch_dict_input",
        [infer_input("minuend", minuend, "FP32"), infer_input("subtrahend", subtrahend, "FP32")],
    )
    assert result.as_numpy("OUTPUT__0").tolist() == [3.0, -2.0]


def test_fewer_config_inputs_than_forward_takes(torch_server: RunningServer) -> None:
    response = requests.get(f"http://{torch_server.url}/v2/models/torch_too_few_inputs/ready")
    assert response.status_code == 400
    assert (
        "unable to load model 'torch_too_few_inputs', configuration expects 1 inputs, model "
        "provides 2" in response.json()["error"]
    )
