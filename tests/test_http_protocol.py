"""The V2 HTTP protocol with Triton's extensions, through a real server and the real tritonclient."""

from __future__ import annotations

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient

from tests.clients import infer_input, simple_inputs
from tests.serving import RunningServer


def test_health_and_server_metadata(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    metadata = client.get_server_metadata()
    assert metadata["name"] == "triton"
    assert set(metadata["extensions"]) == {
        "classification",
        "binary_tensor_data",
        "model_configuration",
        "model_repository",
        "statistics",
        "logging",
        "trace",
        "system_shared_memory",
    }


def test_server_not_ready_while_a_model_is_unavailable(server: RunningServer) -> None:
    # Triton's strict readiness: the test repository holds deliberately broken models.
    assert requests.get(f"http://{server.url}/v2/health/ready").status_code == 400


def test_example_server_is_ready(example_server: RunningServer) -> None:
    assert requests.get(f"http://{example_server.url}/v2/health/ready").status_code == 200


def test_model_metadata(client: httpclient.InferenceServerClient) -> None:
    metadata = client.get_model_metadata("simple")
    assert metadata == {
        "name": "simple",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": "INPUT0", "datatype": "INT32", "shape": [-1, 16]},
            {"name": "INPUT1", "datatype": "INT32", "shape": [-1, 16]},
        ],
        "outputs": [
            {"name": "OUTPUT0", "datatype": "INT32", "shape": [-1, 16]},
            {"name": "OUTPUT1", "datatype": "INT32", "shape": [-1, 16]},
        ],
        "op_libraries": [],
    }
    assert client.get_model_metadata("simple", "1")["name"] == "simple"


def test_model_config_is_tritons_json(client: httpclient.InferenceServerClient) -> None:
    config = client.get_model_config("simple")
    assert config["name"] == "simple"
    assert config["platform"] == "onnxruntime_onnx"
    assert config["backend"] == "onnxruntime"
    assert config["max_batch_size"] == 8
    assert config["input"][0]["data_type"] == "TYPE_INT32"
    assert config["input"][0]["dims"] == [16]  # int64 as JSON numbers, as Triton prints them
    assert config["version_policy"] == {"latest": {"num_versions": 1}}
    assert config["default_model_filename"] == "model.onnx"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_simple(client: httpclient.InferenceServerClient, binary: bool) -> None:
    a, b, inputs = simple_inputs(binary, batch=3)
    outputs = [
        httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("OUTPUT0", "OUTPUT1")
    ]
    result = client.infer("simple", inputs, outputs=outputs, request_id="req-7")
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    response = result.get_response()
    assert response["id"] == "req-7"
    assert response["model_name"] == "simple" and response["model_version"] == "1"


def test_infer_with_client_defaults_returns_binary_outputs(
    client: httpclient.InferenceServerClient,
) -> None:
    a, b, inputs = simple_inputs()
    result = client.infer("simple", inputs)  # no outputs named: binary_data_output
    for output in result.get_response()["outputs"]:
        assert "binary_data_size" in output["parameters"]
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)


def test_requested_output_subset(client: httpclient.InferenceServerClient) -> None:
    a, b, inputs = simple_inputs()
    result = client.infer("simple", inputs, outputs=[httpclient.InferRequestedOutput("OUTPUT1")])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["OUTPUT1"]
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    assert result.as_numpy("OUTPUT0") is None


def test_mixed_binary_and_json_outputs(client: httpclient.InferenceServerClient) -> None:
    a, b, inputs = simple_inputs(binary=True)
    outputs = [
        httpclient.InferRequestedOutput("OUTPUT0", binary_data=False),
        httpclient.InferRequestedOutput("OUTPUT1", binary_data=True),
    ]
    result = client.infer("simple", inputs, outputs=outputs)
    by_name = {o["name"]: o for o in result.get_response()["outputs"]}
    assert by_name["OUTPUT0"]["data"] == (a + b).reshape(-1).tolist()
    assert by_name["OUTPUT1"]["parameters"]["binary_data_size"] == 64
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


def test_explicit_version(client: httpclient.InferenceServerClient) -> None:
    a, b, inputs = simple_inputs()
    result = client.infer("simple", inputs, model_version="1")
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)


def test_plain_json_over_curl_like_http(server: RunningServer) -> None:
    body = {
        "inputs": [
            {
                "name": "INPUT0",
                "datatype": "INT32",
                "shape": [1, 16],
                "data": [[i for i in range(16)]],
            },
            {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": list(range(16))},
        ]
    }
    response = requests.post(f"http://{server.url}/v2/models/simple/versions/1/infer", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert outputs["OUTPUT0"]["data"] == [2 * i for i in range(16)]
    assert outputs["OUTPUT1"] == {
        "name": "OUTPUT1",
        "datatype": "INT32",
        "shape": [1, 16],
        "data": [0] * 16,
    }


# every V2 datatype that ONNX Runtime has, through one identity model, binary and JSON
SAMPLES = {
    "BOOL": np.array([True, False, True]),
    "UINT8": np.array([0, 7, 255], dtype=np.uint8),
    "UINT16": np.array([0, 7, 65535], dtype=np.uint16),
    "UINT32": np.array([0, 7, 2**32 - 1], dtype=np.uint32),
    "UINT64": np.array([0, 7, 2**63 + 5], dtype=np.uint64),
    "INT8": np.array([-128, 0, 127], dtype=np.int8),
    "INT16": np.array([-32768, 1, 32767], dtype=np.int16),
    "INT32": np.array([-(2**31), 1, 2**31 - 1], dtype=np.int32),
    "INT64": np.array([-(2**63), 1, 2**63 - 1], dtype=np.int64),
    "FP16": np.array([0.5, -2.25, 65504.0], dtype=np.float16),
    "FP32": np.array([0.1, -3.5, 1e30], dtype=np.float32),
    "FP64": np.array([0.1, -3.5, 1e300], dtype=np.float64),
    "BYTES": np.array([b"hello", b"", "wörld".encode()], dtype=np.object_),
}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_every_datatype_round_trips(client: httpclient.InferenceServerClient, binary: bool) -> None:
    inputs = [infer_input(f"IN_{t}", array, t, binary) for t, array in SAMPLES.items()]
    outputs = [httpclient.InferRequestedOutput(f"OUT_{t}", binary_data=binary) for t in SAMPLES]
    result = client.infer("all_types", inputs, outputs=outputs)
    for datatype, array in SAMPLES.items():
        got = result.as_numpy(f"OUT_{datatype}")
        if datatype == "BYTES":  # tritonclient gives JSON strings back as str
            assert [e if isinstance(e, bytes) else e.encode() for e in got] == array.tolist()
            continue
        assert got.dtype == array.dtype, datatype
        assert got.tolist() == array.tolist(), datatype
    for output in result.get_response()["outputs"]:
        assert output["datatype"] == output["name"].removeprefix("OUT_")


def test_optional_inputs_may_be_left_out(client: httpclient.InferenceServerClient) -> None:
    x = np.array([1.5, 2.5], dtype=np.float32)
    result = client.infer("optional_input", [infer_input("INPUT0", x, "FP32")])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x + [10, 20])
    bias = np.array([1, 1], dtype=np.float32)
    result = client.infer(
        "optional_input", [infer_input("INPUT0", x, "FP32"), infer_input("BIAS", bias, "FP32")]
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x + 1)


def test_bytes_tensors_through_a_custom_op_library(example_server: RunningServer) -> None:
    client = httpclient.InferenceServerClient(example_server.url)
    text = np.array([[b"hello", b"custom ops"], [b"triton", b"x"]], dtype=np.object_)
    for binary in (True, False):
        result = client.infer(
            "text_ops",
            [infer_input("TEXT", text, "BYTES", binary)],
            outputs=[
                httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("UPPER", "LENGTH")
            ],
        )
        upper = [
            [e if isinstance(e, bytes) else e.encode() for e in row]
            for row in result.as_numpy("UPPER")
        ]
        assert upper == [[b"HELLO", b"CUSTOM OPS"], [b"TRITON", b"X"]]
        assert result.as_numpy("LENGTH").tolist() == [[5, 10], [6, 1]]


def test_example_simple_model(example_server: RunningServer) -> None:
    client = httpclient.InferenceServerClient(example_server.url)
    a, b, inputs = simple_inputs(batch=8)
    result = client.infer("simple", inputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_and_responses(
    client: httpclient.InferenceServerClient, algorithm: str
) -> None:
    a, b, inputs = simple_inputs()
    result = client.infer(
        "simple",
        inputs,
        request_compression_algorithm=algorithm,
        response_compression_algorithm=algorithm,
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


def test_large_tensor_bigger_than_the_shared_memory_ring(test_repository, tmp_path) -> None:
    # a ring of 64 KiB forces the 1 MiB tensors through the worker socket instead
    with RunningServer(
        [test_repository], ["--shm-ring-bytes", "65536"], log_path=tmp_path / "log"
    ) as server:
        client = httpclient.InferenceServerClient(server.url)
        array = np.random.default_rng(0).random((4, 65536), dtype=np.float32)
        for _ in range(3):  # several rounds: the ring's space is released and reused
            result = client.infer("simple", simple_inputs(batch=4)[2])
            np.testing.assert_array_equal(
                result.as_numpy("OUTPUT1"), np.arange(64).reshape(4, 16) - 3
            )
            result = client.infer("vector_fp32", [infer_input("INPUT0", array.reshape(-1), "FP32")])
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), array.reshape(-1))
