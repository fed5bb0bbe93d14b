"""The gRPC frontend with the real tritonclient.grpc: every method, sync, async and streaming."""

from __future__ import annotations

import queue

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.serving import RunningServer


@pytest.fixture(scope="module")
def grpc_client(server: RunningServer):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    yield client
    client.close()


def simple_inputs(batch: int = 1):
    a = np.arange(16 * batch, dtype=np.int32).reshape(batch, 16)
    b = np.full((batch, 16), 5, dtype=np.int32)
    inputs = [
        grpcclient.InferInput("INPUT0", [batch, 16], "INT32"),
        grpcclient.InferInput("INPUT1", [batch, 16], "INT32"),
    ]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return a, b, inputs


def test_health_and_metadata(grpc_client, client) -> None:
    assert grpc_client.is_server_live()
    assert grpc_client.is_server_ready() == client.is_server_ready()  # strict readiness, both sides
    assert grpc_client.is_model_ready("simple") and grpc_client.is_model_ready("simple", "1")
    assert not grpc_client.is_model_ready("ops_missing_library")
    assert not grpc_client.is_model_ready("no_such_model")
    metadata = grpc_client.get_server_metadata(as_json=True)
    assert metadata["name"] == "triton" and "statistics" in metadata["extensions"]
    model = grpc_client.get_model_metadata("simple", as_json=True)
    assert model["platform"] == "onnxruntime_onnx" and model["versions"] == ["1"]
    assert model["inputs"][0] == {"name": "INPUT0", "datatype": "INT32", "shape": ["-1", "16"]}


def test_model_config_is_the_config_message(grpc_client) -> None:
    config = grpc_client.get_model_config("simple").config
    assert config.name == "simple" and config.max_batch_size == 8
    assert config.input[0].dims == [16]
    assert grpc_client.get_model_config("no_config").config.max_batch_size == 4  # auto-completed


def test_infer(grpc_client) -> None:
    a, b, inputs = simple_inputs(batch=3)
    result = grpc_client.infer("simple", inputs, request_id="g-1")
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    assert result.get_response().id == "g-1"
    only = grpc_client.infer("simple", inputs, outputs=[grpcclient.InferRequestedOutput("OUTPUT1")])
    assert only.as_numpy("OUTPUT0") is None
    np.testing.assert_array_equal(only.as_numpy("OUTPUT1"), a - b)


def test_every_datatype_raw(grpc_client) -> None:
    from tests.test_http_protocol import SAMPLES

    inputs = []
    for datatype, array in SAMPLES.items():
        tensor = grpcclient.InferInput(f"IN_{datatype}", list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = grpc_client.infer("all_types", inputs)
    for datatype, array in SAMPLES.items():
        assert result.as_numpy(f"OUT_{datatype}").tolist() == array.tolist(), datatype


def test_typed_contents(server: RunningServer) -> None:
    """The typed `contents` fields, as clients other than tritonclient send them."""
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.grpc_url))
    request = service_pb2.ModelInferRequest(model_name="all_types")
    values = {
        "BOOL": ("bool_contents", [True, False]),
        "INT8": ("int_contents", [-3, 4]),
        "INT16": ("int_contents", [-300, 4]),
        "INT32": ("int_contents", [-3, 40000]),
        "INT64": ("int64_contents", [-(2**40), 1]),
        "UINT8": ("uint_contents", [3, 250]),
        "UINT16": ("uint_contents", [3, 65000]),
        "UINT32": ("uint_contents", [3, 2**32 - 1]),
        "UINT64": ("uint64_contents", [3, 2**64 - 1]),
        "FP32": ("fp32_contents", [0.5, -1.25]),
        "FP64": ("fp64_contents", [0.1, 1e300]),
        "BYTES": ("bytes_contents", [b"typed", b""]),
    }
    for datatype, (field, data) in values.items():
        tensor = request.inputs.add(name=f"IN_{datatype}", datatype=datatype, shape=[2])
        getattr(tensor.contents, field).extend(data)
    tensor = request.inputs.add(name="IN_FP16", datatype="FP16", shape=[2])
    # FP16 has no typed field: mixing raw and typed contents is an error, so send it alone first
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfer(request)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "FP16 data must be sent in raw_input_contents" in raised.value.details()
    request.inputs.pop()
    request.inputs.add(name="IN_FP16", datatype="FP16", shape=[0])  # an empty FP16 tensor is fine
    response = stub.ModelInfer(request)
    outputs = {
        o.name: (o, raw)
        for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }
    assert np.frombuffer(outputs["OUT_INT16"][1], dtype="<i2").tolist() == [-300, 4]
    assert np.frombuffer(outputs["OUT_UINT64"][1], dtype="<u8").tolist() == [3, 2**64 - 1]
    assert np.frombuffer(outputs["OUT_FP64"][1], dtype="<f8").tolist() == [0.1, 1e300]
    assert outputs["OUT_BYTES"][1] == b"\x05\x00\x00\x00typed\x00\x00\x00\x00"


@pytest.mark.parametrize(
    "model, build, code, message",
    [
        (
            "nope",
            lambda: simple_inputs()[2],
            grpc.StatusCode.NOT_FOUND,
            "Request for unknown model: 'nope'",
        ),
        (
            "ops_missing_library",
            lambda: simple_inputs()[2],
            grpc.StatusCode.UNAVAILABLE,
            "libnot_there.so",
        ),
        (
            "simple",
            lambda: simple_inputs()[2][:1],
            grpc.StatusCode.INVALID_ARGUMENT,
            "expected 2 inputs",
        ),
    ],
    ids=["unknown model", "unavailable model", "missing input"],
)
def test_errors_are_grpc_status_codes(grpc_client, model, build, code, message) -> None:
    with pytest.raises(InferenceServerException) as raised:
        grpc_client.infer(model, build())
    assert raised.value.status() == str(code)
    assert message in raised.value.message()
    assert grpc_client.is_model_ready("simple")


def test_async_infer(grpc_client) -> None:
    a, b, inputs = simple_inputs()
    results: queue.Queue = queue.Queue()
    for _ in range(4):
        grpc_client.async_infer(
            "simple", inputs, callback=lambda result, error: results.put((result, error))
        )
    for _ in range(4):
        result, error = results.get(timeout=30)
        assert error is None
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)


def test_streaming(server: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    a, b, inputs = simple_inputs()
    for index in range(5):
        client.async_stream_infer("simple", inputs, request_id=str(index))
    client.async_stream_infer("nope", inputs, request_id="bad")
    seen, errors = set(), []
    for _ in range(6):
        result, error = answers.get(timeout=30)
        if error is not None:
            errors.append(error)
            continue
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
        seen.add(result.get_response().id)
    client.stop_stream()
    client.close()
    assert seen == {"0", "1", "2", "3", "4"}
    assert len(errors) == 1 and "'nope' is not found" in errors[0].message()


def test_repository_methods(grpc_client) -> None:
    index = grpc_client.get_model_repository_index(as_json=True)["models"]
    simple = next(m for m in index if m["name"] == "simple")
    assert simple["state"] == "READY" and simple["version"] == "1"
    with pytest.raises(InferenceServerException) as raised:
        grpc_client.load_model("simple")
    assert raised.value.status() == str(grpc.StatusCode.UNAVAILABLE)
    with pytest.raises(InferenceServerException):
        grpc_client.unload_model("simple")


def test_statistics(grpc_client) -> None:
    before = grpc_client.get_inference_statistics("simple", as_json=True)["model_stats"][0]
    _, _, inputs = simple_inputs(batch=2)
    grpc_client.infer("simple", inputs)
    after = grpc_client.get_inference_statistics("simple", as_json=True)["model_stats"][0]
    assert int(after["inference_count"]) == int(before.get("inference_count", 0)) + 2
    assert int(after["execution_count"]) == int(before.get("execution_count", 0)) + 1
    assert (
        int(after["inference_stats"]["success"]["count"])
        == int(before["inference_stats"]["success"].get("count", 0)) + 1
    )
    with pytest.raises(InferenceServerException) as raised:
        grpc_client.get_inference_statistics("nope")
    assert raised.value.status() == str(grpc.StatusCode.NOT_FOUND)


def test_asyncio_client(server: RunningServer) -> None:
    import asyncio

    import tritonclient.grpc.aio as aioclient

    async def run() -> list[np.ndarray]:
        client = aioclient.InferenceServerClient(server.grpc_url)
        try:
            assert await client.is_model_ready("simple")
            _, _, inputs = simple_inputs()
            results = await asyncio.gather(*(client.infer("simple", inputs) for _ in range(4)))
            return [r.as_numpy("OUTPUT0") for r in results]
        finally:
            await client.close()

    a, b, _ = simple_inputs()
    for output in asyncio.run(run()):
        np.testing.assert_array_equal(output, a + b)


def fp32_identity(client, values: np.ndarray, **options):
    infer_input = grpcclient.InferInput("INPUT0", list(values.shape), "FP32")
    infer_input.set_data_from_numpy(values)
    return client.infer("vector_fp32", [infer_input], **options).as_numpy("OUTPUT0")


def test_large_tensors_cross_flow_control(grpc_client) -> None:
    """24 MiB each way: more than either side's flow-control windows and frame sizes allow at
    once, so both directions wait for WINDOW_UPDATEs."""
    values = np.random.default_rng(0).random(6 * 1024 * 1024, dtype=np.float32)
    np.testing.assert_array_equal(fp32_identity(grpc_client, values), values)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests(grpc_client, algorithm: str) -> None:
    values = np.arange(4096, dtype=np.float32)
    answer = fp32_identity(grpc_client, values, compression_algorithm=algorithm)
    np.testing.assert_array_equal(answer, values)


def test_unknown_method_and_bad_message(server: RunningServer) -> None:
    with grpc.insecure_channel(server.grpc_url) as channel:
        unknown = channel.unary_unary("/inference.GRPCInferenceService/Nope")
        with pytest.raises(grpc.RpcError) as raised:
            unknown(b"")
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as raised:
            infer(b"\xff\xff\xff")  # not a ModelInferRequest
        assert raised.value.code() == grpc.StatusCode.INTERNAL
        assert "could not parse the request message" in raised.value.details()
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(service_pb2.ServerLiveRequest()).live  # the connection still serves


def test_binary_metadata_and_many_concurrent_calls(server: RunningServer) -> None:
    """Calls interleave on one connection (HTTP/2 streams), each answered on its own stream."""
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        futures = [
            stub.ModelReady.future(
                service_pb2.ModelReadyRequest(name="simple" if i % 2 else "nope"),
                metadata=(("trace-bin", bytes([i, 0, 255])),),
            )
            for i in range(64)
        ]
        answers = [future.result(timeout=30).ready for future in futures]
    assert answers == [bool(i % 2) for i in range(64)]
