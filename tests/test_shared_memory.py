"""Triton's system shared-memory extension with the real tritonclient, HTTP and gRPC.

Regions are made with `tritonclient.utils.shared_memory` as a Triton user makes them; inputs are
read from and outputs written to them through ONNX models, alone and mixed with ordinary
tensors; registration, status and each error case answer with Triton's words and codes.
"""

from __future__ import annotations

import itertools
import json
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import (
    InferenceServerException,
    serialize_byte_tensor,
    serialized_byte_size,
)

from tests import models
from tests.conftest import SIMPLE_CONFIG
from tests.serving import RunningServer

CLIENTS = {"http": httpclient, "grpc": grpcclient}
_names = itertools.count()

GATE_MODEL = """
import os
import time

import triton_python_backend_utils as pb_utils

GATE = {gate!r}


class TritonPythonModel:
    def execute(self, requests):
        open(os.path.join(GATE, "started"), "w").close()
        deadline = time.monotonic() + 120
        while not os.path.exists(os.path.join(GATE, "open")) and time.monotonic() < deadline:
            time.sleep(0.01)
        return [
            pb_utils.InferenceResponse(
                [pb_utils.Tensor("OUTPUT0", pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy())]
            )
            for r in requests
        ]
"""


@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gate")


@pytest.fixture(scope="module")
def shm_server(tmp_path_factory: pytest.TempPathFactory, gate: Path) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("shm_models")
    models.write_model(repo, "simple", models.add_sub(), SIMPLE_CONFIG)
    models.write_model(
        repo,
        "simple_cached",
        models.add_sub(),
        SIMPLE_CONFIG.replace('"simple"', '"simple_cached"') + "response_cache { enable: true }\n",
    )
    models.write_model(
        repo,
        "strings",
        models.identity("BYTES", [None]),
        'max_batch_size: 0\ninput [ { name: "INPUT0" data_type: TYPE_STRING dims: [ -1 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_STRING dims: [ -1 ] } ]\n',
    )
    folder = repo / "gate"
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(
        'backend: "python"\nmax_batch_size: 0\n'
        'input [ { name: "INPUT0" data_type: TYPE_INT32 dims: [ 16 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 16 ] } ]\n'
    )
    (folder / "1" / "model.py").write_text(textwrap.dedent(GATE_MODEL.format(gate=str(gate))))
    log = tmp_path_factory.mktemp("shm_logs") / "server.log"
    args = ["--cache-config", "local,size=1048576"]
    with RunningServer([repo], log_path=log, extra_args=args) as running:
        yield running


@pytest.fixture(params=["http", "grpc"])
def protocol(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def client(shm_server: RunningServer, protocol: str):
    module = CLIENTS[protocol]
    url = shm_server.url if protocol == "http" else shm_server.grpc_url
    client = module.InferenceServerClient(url)
    yield client
    client.unregister_system_shared_memory()
    client.close()


class Regions:
    """Regions made and registered for one test, destroyed after it."""

    def __init__(self, client) -> None:
        self.client = client
        self.handles: list = []

    def make(self, byte_size: int, data: np.ndarray | None = None, register: bool = True):
        name = f"opserve_test_{next(_names)}"
        handle = shm.create_shared_memory_region(name, f"/{name}", byte_size)
        self.handles.append(handle)
        if data is not None:
            shm.set_shared_memory_region(handle, [data])
        if register:
            self.client.register_system_shared_memory(name, f"/{name}", byte_size)
        return name, handle

    def destroy(self) -> None:
        for handle in self.handles:
            shm.destroy_shared_memory_region(handle)


@pytest.fixture
def regions(client) -> Iterator[Regions]:
    made = Regions(client)
    yield made
    made.destroy()


def status_names(client, protocol: str) -> list[str]:
    status = client.get_system_shared_memory_status()
    if protocol == "http":
        return [region["name"] for region in status]
    return sorted(status.regions)


A = np.arange(16, dtype=np.int32).reshape(1, 16)
B = np.full((1, 16), 3, dtype=np.int32)


def simple_request(protocol: str, input_regions: list, output_regions: list):
    """Inputs and requested outputs of `simple`; a region given as None sends that tensor
    ordinarily (in the request, or back in the response)."""
    module = CLIENTS[protocol]
    inputs = []
    for name, array, region in zip(("INPUT0", "INPUT1"), (A, B), input_regions, strict=True):
        tensor = module.InferInput(name, [1, 16], "INT32")
        if region is None:
            tensor.set_data_from_numpy(array)
        else:
            tensor.set_shared_memory(*region)
        inputs.append(tensor)
    outputs = []
    for name, region in zip(("OUTPUT0", "OUTPUT1"), output_regions, strict=True):
        output = module.InferRequestedOutput(name)
        if region is not None:
            output.set_shared_memory(*region)
        outputs.append(output)
    return inputs, outputs


def wait_for(condition) -> None:
    """Poll until `condition()` holds; a generous bound only keeps a broken server from hanging
    the suite."""
    deadline = time.monotonic() + 120
    while not condition():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.01)


def error_of(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as raised:
        call()
    return raised.value


def test_server_metadata_lists_the_extension(client, protocol) -> None:
    metadata = client.get_server_metadata()
    extensions = metadata["extensions"] if protocol == "http" else metadata.extensions
    assert "system_shared_memory" in extensions
    assert "cuda_shared_memory" not in extensions


def test_inputs_and_outputs_in_shared_memory(client, protocol, regions) -> None:
    in0, _ = regions.make(64, A)
    in1, _ = regions.make(64, B)
    out0, out0_handle = regions.make(64)
    out1, out1_handle = regions.make(64)
    inputs, outputs = simple_request(protocol, [(in0, 64), (in1, 64)], [(out0, 64), (out1, 64)])
    result = client.infer("simple", inputs, outputs=outputs)
    np.testing.assert_array_equal(shm.get_contents_as_numpy(out0_handle, np.int32, [1, 16]), A + B)
    np.testing.assert_array_equal(shm.get_contents_as_numpy(out1_handle, np.int32, [1, 16]), A - B)
    # as Triton: the output is described, its data is not in the response
    response = result.get_response()
    if protocol == "http":
        assert response["outputs"][0] == {"name": "OUTPUT0", "datatype": "INT32", "shape": [1, 16]}
    else:
        assert list(response.outputs[0].shape) == [1, 16]
        assert list(response.raw_output_contents) == [b"", b""]


def test_mixed_inputs_and_outputs(client, protocol, regions) -> None:
    """One input and one output in shared memory, the others in the messages."""
    in1, _ = regions.make(64, B)
    out0, out0_handle = regions.make(64)
    inputs, outputs = simple_request(protocol, [None, (in1, 64)], [(out0, 64), None])
    result = client.infer("simple", inputs, outputs=outputs)
    np.testing.assert_array_equal(shm.get_contents_as_numpy(out0_handle, np.int32, [1, 16]), A + B)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), A - B)


def test_offsets_within_one_region(client, protocol, regions) -> None:
    """Both inputs and both outputs in one region, at offsets."""
    name, handle = regions.make(256)
    shm.set_shared_memory_region(handle, [A], offset=0)
    shm.set_shared_memory_region(handle, [B], offset=64)
    inputs, outputs = simple_request(
        protocol, [(name, 64, 0), (name, 64, 64)], [(name, 64, 128), (name, 64, 192)]
    )
    client.infer("simple", inputs, outputs=outputs)
    np.testing.assert_array_equal(
        shm.get_contents_as_numpy(handle, np.int32, [1, 16], offset=128), A + B
    )
    np.testing.assert_array_equal(
        shm.get_contents_as_numpy(handle, np.int32, [1, 16], offset=192), A - B
    )
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.int32, [1, 16]), A)


def test_bytes_round_trip(client, protocol, regions) -> None:
    strings = np.array([b"opserve", b"", b"shared memory"], dtype=np.object_)
    serialized = serialize_byte_tensor(strings)  # as Triton's examples do
    size = serialized_byte_size(serialized)
    name, _ = regions.make(size, serialized)
    out, out_handle = regions.make(size)
    module = CLIENTS[protocol]
    tensor = module.InferInput("INPUT0", [3], "BYTES")
    tensor.set_shared_memory(name, size)
    output = module.InferRequestedOutput("OUTPUT0")
    output.set_shared_memory(out, size)
    client.infer("strings", [tensor], outputs=[output])
    got = shm.get_contents_as_numpy(out_handle, np.object_, [3])
    assert list(got) == list(strings)


def test_cached_response_is_written_to_the_region(client, protocol, regions) -> None:
    """A response cache hit never reaches a worker; its outputs still land in the region."""
    in0, _ = regions.make(64, A)
    in1, _ = regions.make(64, B)
    for _ in range(2):
        out0, out0_handle = regions.make(64)
        inputs, outputs = simple_request(protocol, [(in0, 64), (in1, 64)], [(out0, 64), None])
        result = client.infer("simple_cached", inputs, outputs=outputs)
        np.testing.assert_array_equal(
            shm.get_contents_as_numpy(out0_handle, np.int32, [1, 16]), A + B
        )
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), A - B)
    if protocol == "http":
        stats = client.get_inference_statistics("simple_cached")
    else:
        stats = client.get_inference_statistics("simple_cached", as_json=True)
    assert int(stats["model_stats"][0]["inference_stats"]["cache_hit"]["count"]) >= 1


def test_status_and_unregister(client, protocol, regions) -> None:
    first, _ = regions.make(64)
    second, _ = regions.make(128)
    assert status_names(client, protocol) == sorted([first, second])
    one = client.get_system_shared_memory_status(second)
    if protocol == "http":
        assert one == [{"name": second, "key": f"/{second}", "offset": 0, "byte_size": 128}]
    else:
        region = one.regions[second]
        assert (region.name, region.key, region.offset, region.byte_size) == (
            second,
            f"/{second}",
            0,
            128,
        )
    client.unregister_system_shared_memory(first)
    client.unregister_system_shared_memory(first)  # an unknown name is no error (Triton)
    assert status_names(client, protocol) == [second]
    client.unregister_system_shared_memory()
    assert status_names(client, protocol) == []
    error = error_of(lambda: client.get_system_shared_memory_status(second))
    assert f"Unable to find system shared memory region: '{second}'" in error.message()


def test_registration_errors(client, protocol, regions) -> None:
    name, _ = regions.make(64)
    codes = {
        "http": {"exists": "400", "internal": "500", "invalid": "400"},
        "grpc": {
            "exists": str(grpc.StatusCode.ALREADY_EXISTS),
            "internal": str(grpc.StatusCode.INTERNAL),
            "invalid": str(grpc.StatusCode.INVALID_ARGUMENT),
        },
    }[protocol]
    again = error_of(lambda: client.register_system_shared_memory(name, f"/{name}", 64))
    assert f"shared memory region '{name}' already in manager" in again.message()
    assert again.status() == codes["exists"]
    missing = error_of(lambda: client.register_system_shared_memory("x", "/opserve_no_such", 8))
    assert "Unable to open shared memory region: '/opserve_no_such'" in missing.message()
    assert missing.status() == codes["internal"]
    outside = error_of(lambda: client.register_system_shared_memory("x", "/../etc/passwd", 8))
    assert "Unable to open shared memory region" in outside.message()
    key = f"/{name}"
    for byte_size, offset in ((65, 0), (64, 1), (1, 64)):
        too_big = error_of(
            lambda b=byte_size, o=offset: client.register_system_shared_memory("y", key, b, o)
        )
        assert "failed to register shared memory region 'y': invalid args" in too_big.message()
        assert too_big.status() == codes["invalid"]
    assert status_names(client, protocol) == [name]


def test_inference_errors(client, protocol, regions) -> None:
    in0, _ = regions.make(64, A)
    in1, _ = regions.make(64, B)
    small, _ = regions.make(32)
    codes = {
        "http": {"not_found": "404", "invalid": "400", "internal": "500"},
        "grpc": {
            "not_found": str(grpc.StatusCode.NOT_FOUND),
            "invalid": str(grpc.StatusCode.INVALID_ARGUMENT),
            "internal": str(grpc.StatusCode.INTERNAL),
        },
    }[protocol]
    cases = [
        # (inputs' regions, outputs' regions, message, code)
        (
            [("nope", 64), (in1, 64)],
            [None, None],
            "Unable to find shared memory region: 'nope'",
            "not_found",
        ),
        (
            [(in0, 64, 64), (in1, 64)],
            [None, None],
            f"Invalid offset for shared memory region: '{in0}'",
            "invalid",
        ),
        (
            [(in0, 64, 8), (in1, 64)],
            [None, None],
            f"Invalid offset + byte size for shared memory region: '{in0}'",
            "invalid",
        ),
        (
            [(in0, 32), (in1, 64)],
            [None, None],
            "unexpected total byte size 32 for input 'INPUT0', expecting 64",
            "invalid",
        ),
        (
            [(in0, 64), (in1, 64)],
            [(small, 32), None],
            "shared memory size specified with the request for output 'OUTPUT0' (32 bytes) "
            "should be at least 64 bytes to hold the results",
            "internal",
        ),
    ]
    for input_regions, output_regions, message, code in cases:
        inputs, outputs = simple_request(protocol, input_regions, output_regions)
        error = error_of(lambda i=inputs, o=outputs: client.infer("simple", i, outputs=o))
        assert message in error.message()
        assert error.status() == codes[code]
    # nothing is left in use: every region can go
    client.unregister_system_shared_memory()
    assert status_names(client, protocol) == []


def test_region_in_use_is_not_unregistered(
    shm_server: RunningServer, client, protocol, regions, gate: Path
) -> None:
    """Triton's rule: a region a request is using cannot be unregistered; once the request is
    answered it can. The model waits at a gate while the test tries."""
    for mark in ("started", "open"):
        (gate / mark).unlink(missing_ok=True)
    data, _ = regions.make(64, A)
    out, out_handle = regions.make(64)
    spare, _ = regions.make(8)
    module = CLIENTS[protocol]
    tensor = module.InferInput("INPUT0", [16], "INT32")
    tensor.set_shared_memory(data, 64)
    output = module.InferRequestedOutput("OUTPUT0")
    output.set_shared_memory(out, 64)
    answers: list = []
    if protocol == "http":
        async_client = httpclient.InferenceServerClient(shm_server.url, concurrency=2)
        pending = async_client.async_infer("gate", [tensor], outputs=[output])
    else:
        client.async_infer(
            "gate",
            [tensor],
            outputs=[output],
            callback=lambda result, error: answers.append((result, error)),
        )
    wait_for(lambda: (gate / "started").exists())
    other = httpclient.InferenceServerClient(shm_server.url)
    error = error_of(lambda: other.unregister_system_shared_memory(data))
    assert f"Cannot unregister shared memory region '{data}', it is currently in use." in (
        error.message()
    )
    error = error_of(other.unregister_system_shared_memory)
    assert (
        "Failed to unregister the following system shared memory regions: "
        + "".join(f"{n} ," for n in sorted([data, out]))
    ) in error.message()
    assert status_names(client, protocol) == sorted([data, out])  # spare went, the rest stay
    assert spare not in status_names(client, protocol)
    (gate / "open").touch()
    if protocol == "http":
        pending.get_result()
        async_client.close()
    else:
        wait_for(lambda: bool(answers))
        assert answers[0][1] is None
    np.testing.assert_array_equal(shm.get_contents_as_numpy(out_handle, np.int32, [16]), A[0])
    other.unregister_system_shared_memory()
    assert status_names(client, protocol) == []
    other.close()


def test_cuda_shared_memory_is_refused(client, protocol) -> None:
    assert (
        client.get_cuda_shared_memory_status() == []
        if protocol == "http"
        else len(client.get_cuda_shared_memory_status().regions) == 0
    )
    error = error_of(lambda: client.register_cuda_shared_memory("gpu", b"\0" * 64, 0, 64))
    assert "failed to register CUDA shared memory region: 'gpu', GPUs not supported" in (
        error.message()
    )
    assert error.status() == (
        "400" if protocol == "http" else str(grpc.StatusCode.INVALID_ARGUMENT)
    )
    client.unregister_cuda_shared_memory()


def post(server: RunningServer, path: str, body: dict) -> requests.Response:
    return requests.post(f"http://{server.url}{path}", data=json.dumps(body))


def test_http_protocol_errors(shm_server: RunningServer) -> None:
    """What tritonclient never sends: bad register bodies and bad tensor parameters."""
    regions = Regions(httpclient.InferenceServerClient(shm_server.url))
    try:
        _http_protocol_errors(shm_server, regions)
    finally:
        regions.client.unregister_system_shared_memory()
        regions.destroy()


def _http_protocol_errors(shm_server: RunningServer, regions: Regions) -> None:
    name, _ = regions.make(64, A)
    base = "/v2/systemsharedmemory/region/r"
    for body, message in (
        ({"byte_size": 8}, "Shared memory register request has no 'key' field"),
        ({"key": f"/{name}"}, "Shared memory register request has no 'byte_size' field"),
        ({"key": f"/{name}", "byte_size": -1}, "'byte_size' must be a non-negative integer"),
    ):
        response = post(shm_server, f"{base}/register", body)
        assert response.status_code == 400 and message in response.json()["error"]
    tensor = {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16]}
    for parameters, extra, message in (
        (
            {"shared_memory_region": name, "shared_memory_byte_size": 64},
            {"data": list(range(16))},
            "Input must set only one of the following fields",
        ),
        (
            {"shared_memory_region": name},
            {},
            "'shared_memory_byte_size' must be specified along with 'shared_memory_region'",
        ),
        (
            {"shared_memory_byte_size": 64},
            {},
            "'shared_memory_byte_size' can not be specified without 'shared_memory_region'",
        ),
    ):
        body = {
            "inputs": [
                {**tensor, **extra, "parameters": parameters},
                {**tensor, "name": "INPUT1", "data": list(range(16))},
            ]
        }
        response = post(shm_server, "/v2/models/simple/infer", body)
        assert response.status_code == 400 and message in response.json()["error"]
    body = {
        "inputs": [
            {**tensor, "data": list(range(16))},
            {**tensor, "name": "INPUT1", "data": list(range(16))},
        ],
        "outputs": [
            {
                "name": "OUTPUT0",
                "parameters": {
                    "shared_memory_region": name,
                    "shared_memory_byte_size": 64,
                    "binary_data": True,
                },
            }
        ],
    }
    response = post(shm_server, "/v2/models/simple/infer", body)
    assert response.status_code == 400
    assert (
        "Output can't set both 'shared_memory_region' and 'binary_data'"
        in (response.json()["error"])
    )
    # none of the refused requests holds the region
    regions.client.unregister_system_shared_memory(name)
    assert regions.client.get_system_shared_memory_status() == []


def test_grpc_stream_with_shared_memory(shm_server: RunningServer) -> None:
    """ModelStreamInfer takes the same parameters; each answer's output lands in the region."""
    client = grpcclient.InferenceServerClient(shm_server.grpc_url)
    regions = Regions(client)
    answers: list = []
    try:
        in0, _ = regions.make(64, A)
        out0, out0_handle = regions.make(64)
        inputs, outputs = simple_request("grpc", [(in0, 64), None], [(out0, 64), None])
        client.start_stream(callback=lambda result, error: answers.append((result, error)))
        client.async_stream_infer("simple", inputs, outputs=outputs)
        client.stop_stream()  # waits for the answers
        ((result, error),) = answers
        assert error is None
        np.testing.assert_array_equal(
            shm.get_contents_as_numpy(out0_handle, np.int32, [1, 16]), A + B
        )
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), A - B)
        client.unregister_system_shared_memory()  # the stream's request holds nothing
        assert len(client.get_system_shared_memory_status().regions) == 0
    finally:
        regions.destroy()
        client.close()
