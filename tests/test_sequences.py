"""The sequence batcher through a real server, over HTTP and gRPC with tritonclient.

One server holds every model: an ONNX accumulator whose running total is implicit state (direct
and oldest strategies), and a Python model that accumulates by the control inputs (START, END,
READY, CORRID) and by implicit state at once, with uint64 and string correlation ids.
"""

from __future__ import annotations

import importlib.util
import queue
import struct
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx import helper
from tritonclient.utils import InferenceServerException

from tests import models
from tests.framework_models import framework_model
from tests.frameworks import place, requires
from tests.serving import RunningServer
from tests.test_python_models import place_python_model

IDLE_US = 100_000
HAVE_TORCH = importlib.util.find_spec("torch") is not None
TORCH_CONFIG = """
platform: "pytorch_libtorch"
max_batch_size: 4
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 1 ] } ]
sequence_batching {
  oldest { max_candidate_sequences: 2 }
  state [ { input_name: "STATE__1" output_name: "STATE__1" data_type: TYPE_FP32 dims: [ 1 ] } ]
}
"""

ONNX_STATE = """
  state [ { input_name: "INPUT_STATE" output_name: "OUTPUT_STATE" data_type: TYPE_FP32 dims: [ 1 ]
            initial_state { name: "start" data_type: TYPE_FP32 dims: [ 1 ] %s } } ]
"""


def accumulator():
    """OUTPUT = INPUT + INPUT_STATE; the next state is OUTPUT."""
    return models.onnx_model(
        [
            helper.make_node("Add", ["INPUT", "INPUT_STATE"], ["OUTPUT"]),
            helper.make_node("Identity", ["OUTPUT"], ["OUTPUT_STATE"]),
        ],
        [
            models.tensor("INPUT", "FP32", [None, 1]),
            models.tensor("INPUT_STATE", "FP32", [None, 1]),
        ],
        [
            models.tensor("OUTPUT", "FP32", [None, 1]),
            models.tensor("OUTPUT_STATE", "FP32", [None, 1]),
        ],
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("sequences") / "repository"
    models.write_model(
        repo,
        "onnx_direct",
        accumulator(),
        'platform: "onnxruntime_onnx"\nmax_batch_size: 2\n'
        'input [ { name: "INPUT" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'output [ { name: "OUTPUT" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        "sequence_batching { direct { } " + ONNX_STATE % "zero_data: true" + "}\n",
    )
    # inputs and outputs left to auto-complete, which must leave the state tensors out
    oldest = models.write_model(
        repo,
        "onnx_oldest",
        accumulator(),
        'platform: "onnxruntime_onnx"\nmax_batch_size: 4\n'
        "sequence_batching { oldest { max_candidate_sequences: 4 "
        "max_queue_delay_microseconds: 1000 preferred_batch_size: [ 2 ] } "
        + ONNX_STATE % 'data_file: "hundred.bin"'
        + "}\n",
    )
    (oldest / "initial_state").mkdir()
    (oldest / "initial_state" / "hundred.bin").write_bytes(struct.pack("<f", 100.0))
    place_python_model(repo, "python_uint64", "sequence_accumulator")
    strings = place_python_model(repo, "python_string", "sequence_accumulator")
    config = strings / "config.pbtxt"
    text = config.read_text().replace("TYPE_UINT64", "TYPE_STRING")
    config.write_text(text.replace("sequence_batching {", "sequence_batching { oldest { }"))
    idle = place_python_model(repo, "python_idle", "sequence_accumulator")
    config = idle / "config.pbtxt"
    config.write_text(
        config.read_text().replace(
            "sequence_batching {", f"sequence_batching {{ max_sequence_idle_microseconds: {IDLE_US}"
        )
    )
    place_python_model(repo, "python_crash", "sequence_accumulator")
    padded = place_python_model(repo, "python_padded", "sequence_accumulator")
    config = padded / "config.pbtxt"
    config.write_text(
        config.read_text().replace(
            "sequence_batching {",
            "sequence_batching { max_sequence_idle_microseconds: 60000000 "
            "direct { max_queue_delay_microseconds: 1000000 minimum_slot_utilization: 1.0 }",
        )
    )
    if HAVE_TORCH:
        torch = models.write_model(repo, "torch_oldest", None, TORCH_CONFIG)
        place(framework_model("torch_accumulator", "model.pt"), torch / "1" / "model.pt")
    with RunningServer([repo]) as running:
        yield running


@pytest.fixture(scope="module")
def http(server: RunningServer) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(server.url, concurrency=8)


@pytest.fixture(scope="module")
def grpc(server: RunningServer) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(server.grpc_url)


def send(client, model: str, value, sequence_id, start=False, end=False, rows: int = 1, ask=None):
    """One request of a sequence (asking for the outputs `ask`, or for all); the result as
    {output name: array}."""
    module = httpclient if isinstance(client, httpclient.InferenceServerClient) else grpcclient
    datatype = "INT32" if model.startswith("python") else "FP32"
    array = np.full((rows, 1), value, dtype=np.float32 if datatype == "FP32" else np.int32)
    name = "INPUT__0" if model.startswith("torch") else "INPUT"
    made = module.InferInput(name, list(array.shape), datatype)
    made.set_data_from_numpy(array)
    requested = [module.InferRequestedOutput(n) for n in ask] if ask else None
    result = client.infer(
        model,
        [made],
        outputs=requested,
        sequence_id=sequence_id,
        sequence_start=start,
        sequence_end=end,
    )
    response = result.get_response()
    if isinstance(response, dict):
        names = [o["name"] for o in response["outputs"]]
    else:
        names = [o.name for o in response.outputs]
    return {name: result.as_numpy(name) for name in names}


def fresh(server: RunningServer, protocol: str):
    """A client of its own for a thread (tritonclient's HTTP client is not thread-safe)."""
    if protocol == "http":
        return httpclient.InferenceServerClient(server.url)
    return grpcclient.InferenceServerClient(server.grpc_url)


def outputs(client, model: str, sequence_id, values: list[int]) -> list[dict]:
    last = len(values) - 1
    return [
        send(client, model, v, sequence_id, start=i == 0, end=i == last)
        for i, v in enumerate(values)
    ]


def test_onnx_state_direct_interleaved_over_http_and_grpc(http, grpc) -> None:
    first, second = 2**40 + 1, 7
    got = []
    for step, (a, b) in enumerate([(1, 10), (2, 20), (3, 30)]):
        flags = {"start": step == 0, "end": step == 2}
        got.append(
            (
                send(http, "onnx_direct", a, first, **flags),
                send(grpc, "onnx_direct", b, second, ask=["OUTPUT"], **flags),
            )
        )
    assert [float(x["OUTPUT"][0, 0]) for x, _ in got] == [1, 3, 6]
    assert [float(y["OUTPUT"][0, 0]) for _, y in got] == [10, 30, 60]
    # the state output is the server's: never shown to the client
    assert all(set(x) == {"OUTPUT"} and set(y) == {"OUTPUT"} for x, y in got)


def test_oldest_with_string_ids_and_an_initial_state_file(server) -> None:
    results: dict[str, list[float]] = {}

    def run(protocol: str, sequence_id: str, values: list[int]) -> None:
        client = fresh(server, protocol)
        results[sequence_id] = [
            float(r["OUTPUT"][0, 0]) for r in outputs(client, "onnx_oldest", sequence_id, values)
        ]

    threads = [
        threading.Thread(target=run, args=("http", "alpha", [1, 2, 3, 4])),
        threading.Thread(target=run, args=("grpc", "beta", [5, 5, 5])),
        threading.Thread(target=run, args=("http", "gamma", [1, 1])),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {
        "alpha": [101, 103, 106, 110],
        "beta": [105, 110, 115],
        "gamma": [101, 102],
    }


@pytest.mark.parametrize(
    "model, ids", [("python_uint64", (11, 12, 13)), ("python_string", ("x", "y", "z"))]
)
def test_python_model_sees_controls_and_keeps_state(server, model, ids) -> None:
    results: dict[object, list[dict]] = {}

    def run(protocol, sequence_id, values) -> None:
        results[sequence_id] = outputs(fresh(server, protocol), model, sequence_id, values)

    plan = [("http", ids[0], [1, 2, 3]), ("grpc", ids[1], [10, 20, 30, 40]), ("http", ids[2], [7])]
    threads = [threading.Thread(target=run, args=args) for args in plan]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for _, sequence_id, values in plan:
        got = results[sequence_id]
        totals = list(np.cumsum(values))
        assert [int(r["OUTPUT"][0, 0]) for r in got] == totals  # by the control tensors
        assert [int(r["FROM_STATE"][0, 0]) for r in got] == totals  # by the implicit state
        controls = [r["CONTROLS"][0].tolist() for r in got]
        if len(values) == 1:
            assert controls == [[1, 1, 1]]
        else:
            assert controls == [[1, 0, 1]] + [[0, 0, 1]] * (len(values) - 2) + [[0, 1, 1]]
        assert all("OUTPUT_STATE" not in r for r in got)


def test_a_sequence_beyond_the_slots_waits_in_the_backlog(server, http, grpc) -> None:
    """onnx_direct has two slots: a third sequence waits for one and starts from a fresh state."""
    send(http, "onnx_direct", 1, 101, start=True)
    send(grpc, "onnx_direct", 2, 102, start=True)
    answer: dict[str, dict] = {}
    waiting = threading.Thread(
        target=lambda: answer.update(
            third=send(fresh(server, "http"), "onnx_direct", 5, 103, start=True)
        )
    )
    waiting.start()
    assert float(send(http, "onnx_direct", 1, 101, end=True)["OUTPUT"][0, 0]) == 2
    waiting.join()
    assert float(answer["third"]["OUTPUT"][0, 0]) == 5
    assert float(send(grpc, "onnx_direct", 1, 103, end=True)["OUTPUT"][0, 0]) == 6
    assert float(send(grpc, "onnx_direct", 3, 102, end=True)["OUTPUT"][0, 0]) == 5


def test_a_new_start_restarts_an_active_sequence(http) -> None:
    send(http, "python_uint64", 5, 77, start=True)
    send(http, "python_uint64", 5, 77)
    again = send(http, "python_uint64", 1, 77, start=True, end=True)
    assert int(again["OUTPUT"][0, 0]) == 1 and int(again["FROM_STATE"][0, 0]) == 1


def expect_error(client, model: str, message: str, **arguments) -> None:
    with pytest.raises(InferenceServerException) as caught:
        send(client, model, 1, **arguments)
    assert message in caught.value.message()
    if isinstance(client, httpclient.InferenceServerClient):
        assert caught.value.status() == "400"
    else:
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_misuse_is_answered_with_tritons_errors(http, grpc, protocol) -> None:
    client = http if protocol == "http" else grpc
    expect_error(
        client,
        "python_uint64",
        "inference request to model 'python_uint64' must specify a non-zero or non-empty "
        "correlation ID",
        sequence_id=0,
        start=True,
    )
    expect_error(
        client,
        "python_uint64",
        "inference request for sequence 424242 to model 'python_uint64' must specify the START "
        "flag on the first request of the sequence",
        sequence_id=424242,
    )
    expect_error(
        client,
        "python_uint64",
        "sequence batching control 'CORRID' data-type is 'BYTES', but model 'python_uint64' "
        "expects 'UINT64'",
        sequence_id="text",
        start=True,
    )
    expect_error(
        client,
        "python_string",
        "sequence batching control 'CORRID' data-type is 'UINT64', but model 'python_string' "
        "expects 'BYTES'",
        sequence_id=5,
        start=True,
    )
    expect_error(
        client,
        "onnx_direct",
        "inference request to model 'onnx_direct' must specify batch-size 1 due to "
        "requirements of sequence batcher",
        sequence_id=5,
        start=True,
        rows=2,
    )


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_an_idle_sequence_is_released(http, grpc, protocol) -> None:
    client = http if protocol == "http" else grpc
    sequence_id = 900 if protocol == "http" else 901
    assert int(send(client, "python_idle", 4, sequence_id, start=True)["OUTPUT"][0, 0]) == 4
    time.sleep(10 * IDLE_US / 1e6)
    expect_error(
        client,
        "python_idle",
        f"inference request for sequence {sequence_id} to model 'python_idle' must specify the "
        "START flag on the first request of the sequence",
        sequence_id=sequence_id,
    )


def test_sequence_requests_are_counted(http) -> None:
    before = http.get_inference_statistics("python_uint64")["model_stats"][0]
    outputs(http, "python_uint64", 31, [1, 2, 3])
    after = http.get_inference_statistics("python_uint64")["model_stats"][0]
    assert after["inference_count"] - before["inference_count"] == 3
    assert (
        after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"]
        == 3
    )


@requires("torch")
def test_torchscript_state_with_the_same_name_in_and_out(http, grpc) -> None:
    """A TorchScript model reads its state by position, as its inputs (STATE__1 both ways)."""
    for client, sequence_id, values in ((http, 61, [1, 2]), (grpc, 62, [4, 4, 4])):
        got = [r["OUTPUT__0"][0, 0] for r in outputs(client, "torch_oldest", sequence_id, values)]
        assert got == list(np.cumsum(values))


def test_a_worker_crash_loses_its_sequences(server, http) -> None:
    send(http, "python_crash", 1, 501, start=True)
    with pytest.raises(InferenceServerException) as caught:
        send(http, "python_crash", -999, 500, start=True)
    assert caught.value.status() == "500"
    while not http.is_model_ready("python_crash"):  # its worker is replaced
        time.sleep(0.05)
    with pytest.raises(InferenceServerException) as caught:
        send(http, "python_crash", 1, 501)
    assert "sequence 501 of model 'python_crash' version 1 was lost: the instance serving it " in (
        caught.value.message()
    )
    assert int(send(http, "python_crash", 3, 501, start=True)["OUTPUT"][0, 0]) == 3


def test_direct_pads_an_empty_slot_with_a_null_request(server) -> None:
    """python_padded waits (up to its delay) for all four slots: three sequences take slots 0-2,
    the middle one ends, and the next requests of the others run as [A, null, C]."""
    answers: dict[int, dict] = {}

    def run(sequence_id: int, value: int, start: bool) -> None:
        answers[sequence_id] = send(
            fresh(server, "http"), "python_padded", value, sequence_id, start
        )

    def together(*calls: tuple[int, int, bool]) -> None:
        threads = [threading.Thread(target=run, args=call) for call in calls]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    for sequence_id, value in ((71, 1), (72, 2), (73, 3)):  # one by one: slots 0, 1, 2
        run(sequence_id, value, True)
    send(fresh(server, "http"), "python_padded", 0, 72, end=True)
    together((71, 10, False), (73, 30, False))
    assert answers[71]["BATCH"][0].tolist() == [3, 1]  # two sequences and the null between them
    assert [int(answers[i]["OUTPUT"][0, 0]) for i in (71, 73)] == [11, 33]


def test_config_shows_tritons_sequence_defaults(http) -> None:
    batcher = http.get_model_config("onnx_direct")["sequence_batching"]
    assert batcher["max_sequence_idle_microseconds"] == 1_000_000
    assert (
        http.get_model_config("python_idle")["sequence_batching"]["max_sequence_idle_microseconds"]
        == IDLE_US
    )
    oldest = http.get_model_config("onnx_oldest")
    assert oldest["sequence_batching"]["oldest"]["preferred_batch_size"] == [2]
    # auto-complete left the state tensors out of the config's inputs and outputs
    assert [t["name"] for t in oldest["input"]] == ["INPUT"]
    assert [t["name"] for t in oldest["output"]] == ["OUTPUT"]
    strings = http.get_model_config("python_string")["sequence_batching"]["oldest"]
    assert strings["preferred_batch_size"] == [4]


def test_sequences_over_one_grpc_stream(server) -> None:
    """Triton's sequence stream client: interleaved sequences on one ModelStreamInfer stream."""
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    plan = [(81, 1, True, False), (82, 5, True, False), (81, 2, False, True), (82, 5, False, True)]
    for sequence_id, value, start, end in plan:
        made = grpcclient.InferInput("INPUT", [1, 1], "FP32")
        made.set_data_from_numpy(np.full((1, 1), value, dtype=np.float32))
        client.async_stream_infer(
            "onnx_direct",
            [made],
            request_id=f"{sequence_id}-{value}-{end}",
            sequence_id=sequence_id,
            sequence_start=start,
            sequence_end=end,
        )
    got = {}
    for _ in plan:
        result, error = answers.get(timeout=60)
        assert error is None
        got[result.get_response().id] = float(result.as_numpy("OUTPUT")[0, 0])
    client.stop_stream()
    assert got == {"81-1-False": 1, "82-5-False": 5, "81-2-True": 3, "82-5-True": 10}
