"""Protocol details as Triton has them (issue 15, item 6), on the session's shared server: JSON
nesting, the raw binary request, which outputs come back binary, the classification extension
over HTTP and gRPC, and gRPC's 32-bit contents for 8- and 16-bit integers."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.clients import infer_input
from tests.serving import RunningServer


def infer_url(server: RunningServer, model: str) -> str:
    return f"http://{server.url}/v2/models/{model}/infer"


def nested(value, depth: int):
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "model, datatype, value, depth, allowed",
    [
        ("vector_fp32", "FP32", 1.5, 50, True),
        ("vector_fp32", "FP32", 1.5, 120, False),
        ("all_types", "BYTES", "hello", 120, False),
    ],
)
def test_json_nesting_is_limited_as_in_triton(
    server: RunningServer, model: str, datatype: str, value, depth: int, allowed: bool
) -> None:
    """Triton refuses `data` nested 100 deep or more, with its words (http_server.cc
    `ReadDataFromJsonHelper`; L0_http `test_json_recursion_depth_limit`)."""
    name = "INPUT0" if model == "vector_fp32" else f"IN_{datatype}"
    body = {
        "inputs": [{"name": name, "datatype": datatype, "shape": [1], "data": nested(value, depth)}]
    }
    response = requests.post(infer_url(server, model), data=json.dumps(body))
    if allowed:
        assert response.status_code == 200, response.text
        assert response.json()["outputs"][0]["data"] == [value]
    else:
        assert response.status_code == 400
        assert "JSON nesting depth exceeds maximum allowed limit (100)" in response.json()["error"]


def raw_request(server: RunningServer, model: str, body: bytes) -> requests.Response:
    return requests.post(
        infer_url(server, model), data=body, headers={"Inference-Header-Content-Length": "0"}
    )


def binary_outputs(response: requests.Response) -> tuple[dict, bytes]:
    length = int(response.headers["Inference-Header-Content-Length"])
    return json.loads(response.content[:length]), response.content[length:]


def test_raw_binary_request_for_a_single_input_model(server: RunningServer) -> None:
    """The body is the one input's data; its shape is deduced from the config (batch 1 for a
    batching model); every output comes back binary (docs/protocol/extension_binary_data.md,
    "Raw Binary Request"; core `InferenceRequest::Normalize`)."""
    values = np.array([1.0, -2.5, 3.25], dtype=np.float32)
    response = raw_request(server, "vector_fp32", values.tobytes())
    assert response.status_code == 200, response.text
    header, data = binary_outputs(response)
    (output,) = header["outputs"]
    assert output["shape"] == [3] and output["parameters"] == {"binary_data_size": 12}
    assert np.frombuffer(data, dtype=np.float32).tolist() == values.tolist()

    batched = np.arange(16, dtype=np.float32)
    header, data = binary_outputs(raw_request(server, "partial_config", batched.tobytes()))
    assert header["outputs"][0]["shape"] == [1, 16]
    assert np.frombuffer(data, dtype=np.float32).tolist() == batched.tolist()

    refused = raw_request(server, "simple", b"\0" * 64)
    assert refused.status_code == 400
    assert (
        "Raw request must only have 1 input (found 1) to be deduced but got 2 inputs in "
        "'simple' model configuration" in refused.json()["error"]
    )


def test_binary_data_output_leaves_requested_outputs_as_they_say(server: RunningServer) -> None:
    """`binary_data_output` sets the outputs that are not requested; a requested output is
    binary only when its own `binary_data` says so (http_server.cc `CheckBinaryOutputData`,
    `InferResponseAlloc`)."""
    inputs = [
        {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": list(range(16))},
        {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16},
    ]
    body = {
        "inputs": inputs,
        "parameters": {"binary_data_output": True},
        "outputs": [
            {"name": "OUTPUT0", "parameters": {"binary_data": False}},
            {"name": "OUTPUT1"},
        ],
    }
    response = requests.post(infer_url(server, "simple"), data=json.dumps(body))
    assert response.status_code == 200 and "Inference-Header-Content-Length" not in response.headers
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert outputs["OUTPUT0"]["data"] == [i + 1 for i in range(16)]
    assert outputs["OUTPUT1"]["data"] == [i - 1 for i in range(16)]

    del body["outputs"]  # none requested: all binary
    header, data = binary_outputs(requests.post(infer_url(server, "simple"), data=json.dumps(body)))
    assert [o["parameters"]["binary_data_size"] for o in header["outputs"]] == [64, 64]
    assert len(data) == 128


SCORES = np.array([[0.5, 3.25, 0.0, 2.0], [4.0, 1.0, 1.0, -1.0]], dtype=np.float32)
# Triton's "value:index[:label]", values as C++'s std::to_string writes them; class 1 has an
# empty label line, so no label
TOP_THREE = [
    [b"3.250000:1", b"2.000000:3:fish", b"0.500000:0:cat"],
    [b"4.000000:0:cat", b"1.000000:1", b"1.000000:2:bird"],
]


def test_classification_over_http(server: RunningServer) -> None:
    """An output requested with a class count comes back as BYTES `[batch, count]` of its top
    classes with the labels of its label_filename (server src/classification.cc;
    docs/protocol/extension_classification.md)."""
    client = httpclient.InferenceServerClient(server.url)
    assert "classification" in client.get_server_metadata()["extensions"]
    result = client.infer(
        "classifier",
        [infer_input("INPUT0", SCORES, "FP32")],
        outputs=[httpclient.InferRequestedOutput("OUTPUT0", class_count=3)],
    )
    assert result.get_output("OUTPUT0")["datatype"] == "BYTES"
    assert result.as_numpy("OUTPUT0").tolist() == TOP_THREE

    body = {
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}],
        "outputs": [{"name": "OUTPUT0", "parameters": {"classification": 9}}],
    }
    answer = requests.post(infer_url(server, "classifier"), data=json.dumps(body)).json()
    (output,) = answer["outputs"]
    assert output["shape"] == [1, 4]  # no more classes than the output has
    assert output["data"] == ["4.000000:3:fish", "3.000000:2:bird", "2.000000:1", "1.000000:0:cat"]

    body["outputs"][0]["parameters"]["classification"] = -1
    refused = requests.post(infer_url(server, "classifier"), data=json.dumps(body))
    assert refused.status_code == 400 and "Unable to set 'classification'" in refused.text


def test_classification_over_grpc(server: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    tensor = grpcclient.InferInput("INPUT0", list(SCORES.shape), "FP32")
    tensor.set_data_from_numpy(SCORES)
    result = client.infer(
        "classifier", [tensor], outputs=[grpcclient.InferRequestedOutput("OUTPUT0", class_count=3)]
    )
    assert result.as_numpy("OUTPUT0").tolist() == TOP_THREE
    # integers without labels: "value:index"
    a = grpcclient.InferInput("INPUT0", [1, 16], "INT32")
    a.set_data_from_numpy(np.arange(16, dtype=np.int32).reshape(1, 16) * 3)
    b = grpcclient.InferInput("INPUT1", [1, 16], "INT32")
    b.set_data_from_numpy(np.ones((1, 16), dtype=np.int32))
    result = client.infer(
        "simple", [a, b], outputs=[grpcclient.InferRequestedOutput("OUTPUT0", class_count=2)]
    )
    assert result.as_numpy("OUTPUT0").tolist() == [[b"46:15", b"43:14"]]


def test_a_label_file_that_is_missing_fails_the_load(server: RunningServer) -> None:
    response = requests.get(f"http://{server.url}/v2/models/labels_missing/ready")
    assert response.status_code == 400
    assert "failed to open text file for read" in response.json()["error"]


def typed_request(datatype: str, field: str, values: list[int]) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="small_ints")
    for name in ("INT8", "INT16", "UINT8", "UINT16"):
        tensor = request.inputs.add(name=f"IN_{name}", datatype=name, shape=[len(values)])
        if name == datatype:
            getattr(tensor.contents, field).extend(values)
        else:
            (
                tensor.contents.int_contents
                if name.startswith("I")
                else tensor.contents.uint_contents
            ).extend([0] * len(values))
    return request


def test_grpc_small_integers_in_32_bit_contents(server: RunningServer) -> None:
    """`int_contents` / `uint_contents` carry INT8, INT16, UINT8 and UINT16, each value cut to
    its low bytes, as Triton reads them (grpc/infer_handler.cc `InferGRPCToInput`)."""
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        cases = [
            ("INT8", "int_contents", [1, -2, 127, 300], np.int8, [1, -2, 127, 44]),
            ("INT16", "int_contents", [-7, 40000], np.int16, [-7, -25536]),
            ("UINT8", "uint_contents", [0, 255, 256 + 9], np.uint8, [0, 255, 9]),
            ("UINT16", "uint_contents", [65535, 70000], np.uint16, [65535, 4464]),
        ]
        for datatype, field, values, dtype, expected in cases:
            response = stub.ModelInfer(typed_request(datatype, field, values))
            index = [o.name for o in response.outputs].index(f"OUT_{datatype}")
            data = np.frombuffer(response.raw_output_contents[index], dtype=dtype)
            assert data.tolist() == expected, datatype

        wrong = typed_request("INT8", "int64_contents", [1, 2])
        with pytest.raises(grpc.RpcError) as raised:
            stub.ModelInfer(wrong)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (
            "unexpected explicit tensor data for input tensor 'IN_INT8' for model 'small_ints' "
            "of type 'INT64', expected datatype 'INT8'" in raised.value.details()
        )

        mixed = typed_request("INT8", "int_contents", [1])
        mixed.raw_input_contents.append(b"\0")
        with pytest.raises(grpc.RpcError) as raised:
            stub.ModelInfer(mixed)
        assert (
            "contents field must not be specified when using raw_input_contents for 'IN_INT8' "
            "for model 'small_ints'" in raised.value.details()
        )


def test_duplicate_names_in_tritons_words(server: RunningServer) -> None:
    """L0_http `test_duplicate_output_names`, L0_grpc python_unit_test: "... already exists in
    request"."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    tensor = grpcclient.InferInput("INPUT0", [3], "FP32")
    tensor.set_data_from_numpy(np.zeros(3, dtype=np.float32))
    with pytest.raises(InferenceServerException) as raised:
        client.infer(
            "vector_fp32",
            [tensor],
            outputs=[grpcclient.InferRequestedOutput("OUTPUT0")] * 2,
        )
    assert "output 'OUTPUT0' already exists in request" in raised.value.message()
