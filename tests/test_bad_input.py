"""Bad input gets a clear error in V2's format with Triton's status code, and changes nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.clients import simple_answers
from tests.serving import RunningServer


def post(
    server: RunningServer, path: str, body: bytes | str, headers: dict[str, str] | None = None
):
    data = body.encode() if isinstance(body, str) else body
    return requests.post(f"http://{server.url}{path}", data=data, headers=headers or {})


def simple_body(**overrides) -> dict:
    body = {
        "inputs": [
            {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": list(range(16))},
            {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16},
        ]
    }
    body.update(overrides)
    return body


def with_input(index: int, **changes) -> dict:
    body = simple_body()
    body["inputs"][index].update(changes)
    return body


CASES = {
    "malformed JSON": (
        "/v2/models/simple/infer",
        '{"inputs": [',
        400,
        "failed to parse the request JSON",
    ),
    "not an object": ("/v2/models/simple/infer", "[1, 2]", 400, "must be a JSON object"),
    "no inputs": ("/v2/models/simple/infer", "{}", 400, "'inputs' array"),
    "wrong datatype": (
        "/v2/models/simple/infer",
        with_input(0, datatype="FP32"),
        400,
        "inference input 'INPUT0' data-type is 'FP32', but model 'simple' expects 'INT32'",
    ),
    "unknown datatype": (
        "/v2/models/simple/infer",
        with_input(0, datatype="INT33"),
        400,
        "unknown datatype",
    ),
    "wrong shape": (
        "/v2/models/simple/infer",
        with_input(0, shape=[1, 8], data=list(range(8))),
        400,
        "unexpected shape for input 'INPUT0' for model 'simple'. Expected [-1,16], got [1,8]",
    ),
    "missing batch dimension": (
        "/v2/models/simple/infer",
        with_input(0, shape=[16]),
        400,
        "unexpected shape for input 'INPUT0'",
    ),
    "batch too large": (
        "/v2/models/simple/infer",
        with_input(0, shape=[9, 16], data=[0] * 144),
        400,
        "batch-size must be <= 8",
    ),
    "batch of zero": (
        "/v2/models/simple/infer",
        {
            "inputs": [
                {"name": n, "datatype": "INT32", "shape": [0, 16], "data": []}
                for n in ("INPUT0", "INPUT1")
            ]
        },
        400,
        "batch-size must be >= 1",
    ),
    "data does not fill the shape": (
        "/v2/models/simple/infer",
        with_input(0, data=list(range(15))),
        400,
        "unexpected total byte size 60 for input 'INPUT0', expecting 64",
    ),
    "strings for integers": (
        "/v2/models/simple/infer",
        with_input(0, data=["a"] * 16),
        400,
        "must be integers",
    ),
    "floats for integers": (
        "/v2/models/simple/infer",
        with_input(0, data=[0.5] * 16),
        400,
        "must be integers",
    ),
    "an integral float for integers": (  # rapidjson's IsInt, as Triton checks: 2.0 is not one
        "/v2/models/simple/infer",
        with_input(0, data=[2.0] + [1] * 15),
        400,
        "data of datatype INT32 must be integers",
    ),
    "a boolean among integers": (  # numpy would have made it 1
        "/v2/models/simple/infer",
        with_input(0, data=[True] + [1] * 15),
        400,
        "data of datatype INT32 must be integers",
    ),
    "out of range": ("/v2/models/simple/infer", with_input(0, data=[2**40] * 16), 400, "INT32"),
    "a parameter that is not a scalar": (
        "/v2/models/simple/infer",
        simple_body(parameters={"tags": ["a"]}),
        400,
        "parameter 'tags' has invalid type. It should be either 'int', 'bool', or 'string'.",
    ),
    "missing input": (
        "/v2/models/simple/infer",
        {"inputs": simple_body()["inputs"][:1]},
        400,
        "expected 2 inputs but got 1 inputs for model 'simple'",
    ),
    "unknown input": (
        "/v2/models/simple/infer",
        {
            "inputs": simple_body()["inputs"]
            + [{"name": "INPUT9", "datatype": "INT32", "shape": [1], "data": [1]}]
        },
        400,
        "unexpected inference input 'INPUT9' for model 'simple'",
    ),
    "input given twice": (
        "/v2/models/simple/infer",
        {"inputs": simple_body()["inputs"] * 2},
        400,
        "input 'INPUT0' already exists in request",  # Triton's words
    ),
    "unknown output": (
        "/v2/models/simple/infer",
        simple_body(outputs=[{"name": "OUTPUT7"}]),
        400,
        "unexpected inference output 'OUTPUT7' for model 'simple'",
    ),
    "classification of a count that is not a number": (
        "/v2/models/simple/infer",
        simple_body(outputs=[{"name": "OUTPUT0", "parameters": {"classification": "2"}}]),
        400,
        "Unable to set 'classification'",
    ),
    "data and shared memory": (
        "/v2/models/simple/infer",
        with_input(0, parameters={"shared_memory_region": "r", "shared_memory_byte_size": 64}),
        400,
        "Input must set only one of the following fields: 'data', 'binary_data_size' in "
        "'parameters', 'shared_memory_region' in 'parameters'. But set 'data' "
        "'shared_memory_region'",
    ),
    "unknown model": (
        "/v2/models/nope/infer",
        simple_body(),
        404,
        "Request for unknown model: 'nope' is not found",
    ),
    "unknown version": (
        "/v2/models/simple/versions/7/infer",
        simple_body(),
        404,
        "'simple' version 7 is not found",
    ),
    "non-numeric version": (  # Triton's words
        "/v2/models/simple/versions/latest/infer",
        simple_body(),
        400,
        "failed to get model version from specified version string 'latest' (details: stol), "
        "version should be an integral value > 0",
    ),
    "non-ASCII digit as the version": (
        "/v2/models/simple/versions/%C2%B2/infer",
        simple_body(),
        400,
        "specified version string '²'",
    ),
    "version past int64": (
        "/v2/models/simple/versions/" + "9" * 5000 + "/infer",
        simple_body(),
        400,
        "version should be an integral value > 0",
    ),
    "negative version": (
        "/v2/models/simple/versions/-1/infer",
        simple_body(),
        400,
        "invalid model version specified '-1' , version should be an integral value > 0",
    ),
    "a datatype that is a list": (
        "/v2/models/simple/infer",
        with_input(0, datatype=["INT32"]),
        400,
        "input 'INPUT0' has an unknown datatype: ['INT32']",
    ),
    "unavailable model": (
        "/v2/models/ops_missing_library/infer",
        simple_body(),
        503,
        "libnot_there.so",
    ),
    "unknown route": ("/v2/models/simple/explode", "{}", 404, "unknown path"),
    "an output requested twice": (
        "/v2/models/simple/infer",
        simple_body(outputs=[{"name": "OUTPUT0"}, {"name": "OUTPUT0"}]),
        400,
        "output 'OUTPUT0' already exists in request",  # Triton's words (L0_http)
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_request_is_a_clear_error(server: RunningServer, case: str) -> None:
    path, body, status, message = CASES[case]
    response = post(server, path, body if isinstance(body, str) else json.dumps(body))
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert message in response.json()["error"]


def _binary_request(sizes: tuple[int, int], payload: bytes) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT0",
                    "datatype": "INT32",
                    "shape": [1, 16],
                    "parameters": {"binary_data_size": sizes[0]},
                },
                {
                    "name": "INPUT1",
                    "datatype": "INT32",
                    "shape": [1, 16],
                    "parameters": {"binary_data_size": sizes[1]},
                },
            ]
        }
    ).encode()
    return header + payload, {"Inference-Header-Content-Length": str(len(header))}


@pytest.mark.parametrize(
    "sizes, payload, message",
    [
        ((64, 64), bytes(100), "runs past the end of the request body"),
        ((64, 64), bytes(200), "add up to 128"),
        ((60, 68), bytes(128), "unexpected total byte size 60 for input 'INPUT0', expecting 64"),
    ],
    ids=["too little data", "too much data", "sizes do not match the shapes"],
)
def test_binary_sizes_that_do_not_match(server: RunningServer, sizes, payload, message) -> None:
    body, headers = _binary_request(sizes, payload)
    response = post(server, "/v2/models/simple/infer", body, headers)
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_header_length_outside_the_body(server: RunningServer) -> None:
    body, _ = _binary_request((64, 64), bytes(128))
    response = post(
        server, "/v2/models/simple/infer", body, {"Inference-Header-Content-Length": "999999"}
    )
    assert response.status_code == 400
    assert "outside the body" in response.json()["error"]
    response = post(
        server, "/v2/models/simple/infer", body, {"Inference-Header-Content-Length": "x"}
    )
    assert response.status_code == 400


def test_malformed_binary_bytes_tensor(server: RunningServer) -> None:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "IN_BYTES",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": 6},
                }
            ]
        }
    ).encode()
    body = header + (100).to_bytes(4, "little") + b"ab"  # claims 100 bytes, has 2
    response = post(
        server,
        "/v2/models/all_types/infer",
        body,
        {"Inference-Header-Content-Length": str(len(header))},
    )
    assert response.status_code == 400
    assert "malformed BYTES tensor" in response.json()["error"]


def test_wrong_method(server: RunningServer) -> None:
    response = requests.get(f"http://{server.url}/v2/models/simple/infer")
    assert response.status_code == 400
    assert "use POST" in response.json()["error"]


def test_tritonclient_sees_the_error_and_the_server_keeps_serving(
    client: httpclient.InferenceServerClient,
) -> None:
    bad = httpclient.InferInput("INPUT0", [1, 16], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 16), dtype=np.float32))
    with pytest.raises(InferenceServerException) as raised:
        client.infer("simple", [bad])
    assert raised.value.status() == "400"
    assert "data-type is 'FP32'" in raised.value.message()
    # nothing was lost: the same model answers a good request
    assert simple_answers(client)
    assert client.is_model_ready("simple")


def test_an_empty_tensor_is_an_empty_answer(server: RunningServer) -> None:
    """A batch of one with no elements ([1, 0]) is valid: the identity answers it empty, over
    JSON, binary and gRPC (a memoryview of such a shape cannot be cast to bytes)."""
    empty = {"name": "INPUT0", "datatype": "FP32", "shape": [1, 0], "data": []}
    response = post(server, "/v2/models/batched_vectors/infer", json.dumps({"inputs": [empty]}))
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    assert (output["shape"], output["data"]) == ([1, 0], [])

    import tritonclient.grpc as grpcclient

    for module, url in ((httpclient, server.url), (grpcclient, server.grpc_url)):
        client = module.InferenceServerClient(url)
        tensor = module.InferInput("INPUT0", [1, 0], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 0), dtype=np.float32))
        result = client.infer("batched_vectors", [tensor]).as_numpy("OUTPUT0")
        assert result.shape == (1, 0) and result.dtype == np.float32
        client.close()
