"""Python models (Triton's `model.py` API) through a real server, over HTTP and gRPC.

The models are in tests/python_models/, written for this suite.
"""

from __future__ import annotations

import json
import queue
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests import models
from tests.conftest import custom_op_config
from tests.frameworks import requires
from tests.oplibs import build
from tests.serving import RunningServer

SOURCES = Path(__file__).resolve().parent / "python_models"


def place_python_model(repository: Path, name: str, source: str | None = None) -> Path:
    """tests/python_models/<source> as <repository>/<name> (config.pbtxt, 1/model.py)."""
    origin = SOURCES / (source or name)
    folder = repository / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    config = (origin / "config.pbtxt").read_text()
    (folder / "config.pbtxt").write_text(f'name: "{name}"\n{config}')
    shutil.copyfile(origin / "model.py", folder / "1" / "model.py")
    return folder


FAULTY_ENSEMBLE = """name: "faulty_ensemble"
platform: "ensemble"
max_batch_size: 0
input [ { name: "MODE" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
ensemble_scheduling { step [ { model_name: "faulty" model_version: -1
  input_map { key: "MODE" value: "MODE" } output_map { key: "OUT" value: "OUT" } } ] }
"""


@pytest.fixture(scope="module")
def repository(tmp_path_factory, my_ops_library: Path) -> Path:
    repo = tmp_path_factory.mktemp("python") / "repository"
    for name in (
        "add_sub",
        "auto_complete",
        "bls",
        "bls_async",
        "repeat",
        "metrics",
        "faulty",
        "init_fails",
        "ticker",
        "bls_stream",
        "repeat_batched",
    ):
        place_python_model(repo, name)
    # faulty as the one step of an ensemble: its client's going away must reach the step
    (repo / "faulty_ensemble" / "1").mkdir(parents=True)
    (repo / "faulty_ensemble" / "config.pbtxt").write_text(FAULTY_ENSEMBLE)
    # the model BLS calls: our own ONNX Runtime custom op (x + 1), its library in its folder
    folder = models.write_model(
        repo,
        "custom_add_one",
        models.custom_op(),
        custom_op_config("custom_add_one", "libmy_ops.so"),
    )
    build.copy_to(my_ops_library, folder / "libmy_ops.so")
    return repo


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[RunningServer]:
    with RunningServer([repository]) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(server.url)


@pytest.fixture(scope="module")
def grpc_client(server: RunningServer) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(server.grpc_url)


def tensor(module, name: str, array: np.ndarray, datatype: str):
    made = module.InferInput(name, list(array.shape), datatype)
    made.set_data_from_numpy(array)
    return made


def add_sub_inputs(module, rows: int = 1) -> tuple[list, np.ndarray, np.ndarray]:
    a = np.arange(4 * rows, dtype=np.float32).reshape(rows, 4)
    b = np.full((rows, 4), 0.5, dtype=np.float32)
    return [tensor(module, "INPUT0", a, "FP32"), tensor(module, "INPUT1", b, "FP32")], a, b


# the model.py contract ---------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_add_sub_answers_with_the_initialize_arguments(
    client, grpc_client, repository: Path, protocol: str
) -> None:
    module, user = (httpclient, client) if protocol == "http" else (grpcclient, grpc_client)
    inputs, a, b = add_sub_inputs(module, rows=2)
    result = user.infer("add_sub", inputs, request_id="r-17", parameters={"colour": "blue"})
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    args = json.loads(result.as_numpy("ARGS")[0][0])
    assert args["model_name"] == "add_sub"
    assert args["model_version"] == "1"
    assert args["model_repository"] == str((repository / "add_sub").resolve())
    assert args["model_instance_kind"] == "CPU"
    assert args["model_instance_device_id"] == "0"
    assert args["model_instance_name"] in ("add_sub_0_0", "add_sub_0_1")
    config = json.loads(args["model_config"])
    assert config["name"] == "add_sub" and config["max_batch_size"] == 8
    assert config["instance_group"][0]["count"] == 2
    assert args["request_id"] == "r-17"
    assert args["parameters"] == {"colour": "blue"}
    assert args["requested"] == ["ARGS", "BATCH", "OUTPUT0", "OUTPUT1"]  # none named: all
    assert " " not in args["model_config"]  # compact, as Triton gives it


def test_requested_outputs_are_the_only_outputs(client) -> None:
    inputs, a, b = add_sub_inputs(httpclient)
    outputs = [httpclient.InferRequestedOutput("OUTPUT1")]
    result = client.infer("add_sub", inputs, outputs=outputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    assert result.as_numpy("OUTPUT0") is None
    assert result.as_numpy("ARGS") is None


def test_dynamic_batching_hands_execute_a_list_of_requests(server: RunningServer) -> None:
    """preferred_batch_size 4 with a long queue delay: four requests sent together reach one
    execute call as a list of four."""
    answers: queue.Queue[int] = queue.Queue()

    def one() -> None:
        own = httpclient.InferenceServerClient(server.url)
        inputs, _, _ = add_sub_inputs(httpclient)
        answers.put(int(own.infer("add_sub", inputs).as_numpy("BATCH")[0][0]))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(answers.get() for _ in range(4)) == [4, 4, 4, 4]


def test_auto_complete_config_shapes_the_model(client) -> None:
    config = client.get_model_config("auto_complete")
    assert config["max_batch_size"] == 16
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["input"]] == [
        ("X", "TYPE_INT64", [3])
    ]
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["output"]] == [
        ("Y", "TYPE_INT64", [3])
    ]
    assert "dynamic_batching" in config
    x = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64)
    result = client.infer("auto_complete", [tensor(httpclient, "X", x, "INT64")])
    np.testing.assert_array_equal(result.as_numpy("Y"), x * 2)


# BLS ---------------------------------------------------------------------------------------------
def bls_inputs(module, target: str) -> tuple[list, np.ndarray]:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    names = np.array([target.encode()], dtype=np.object_)
    return [tensor(module, "INPUT0", x, "FP32"), tensor(module, "TARGET", names, "BYTES")], x


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bls_calls_a_custom_op_model(client, grpc_client, protocol: str) -> None:
    module, user = (httpclient, client) if protocol == "http" else (grpcclient, grpc_client)
    inputs, x = bls_inputs(module, "custom_add_one")
    result = user.infer("bls", inputs)
    assert result.as_numpy("ERROR")[0] == b""
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), (x + 1) * 2)


def test_async_bls_calls_run_concurrently_from_async_execute(client) -> None:
    inputs, x = bls_inputs(httpclient, "custom_add_one")
    result = client.infer("bls_async", inputs)
    assert result.as_numpy("ERROR")[0] == b""
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), (x + 1) * 2)


@pytest.mark.parametrize("model", ["bls", "bls_async"])
def test_bls_errors_come_back_as_response_errors(client, model: str) -> None:
    inputs, _ = bls_inputs(httpclient, "no_such_model")
    error = client.infer(model, inputs).as_numpy("ERROR")[0].decode()
    assert "no_such_model" in error and "unknown model" in error.lower()


def test_bls_streams_a_decoupled_model(client) -> None:
    values = np.array([2, 3, 5], dtype=np.int32)
    result = client.infer("bls_stream", [tensor(httpclient, "IN", values, "INT32")])
    assert int(result.as_numpy("SUM")[0]) == 10
    assert int(result.as_numpy("RESPONSES")[0]) == 4  # three answers and the final flag


def test_bls_to_a_decoupled_model_without_decoupled_is_an_error(client) -> None:
    inputs, _ = bls_inputs(httpclient, "repeat")
    error = client.infer("bls", inputs).as_numpy("ERROR")[0].decode()
    assert "decoupled" in error


# decoupled models --------------------------------------------------------------------------------
def stream_repeat(
    server: RunningServer, values: list[int], fail_at: int | None = None, empty_final=False
) -> list:
    answers: queue.Queue = queue.Queue()
    user = grpcclient.InferenceServerClient(server.grpc_url)
    user.start_stream(callback=lambda result, error: answers.put((result, error)))
    inputs = [tensor(grpcclient, "IN", np.array(values, dtype=np.int32), "INT32")]
    if fail_at is not None:
        inputs.append(tensor(grpcclient, "FAIL_AT", np.array([fail_at], dtype=np.int32), "INT32"))
    user.async_stream_infer(
        "repeat", inputs, request_id="s-1", enable_empty_final_response=empty_final
    )
    expected = len(values) + (1 if empty_final else 0)
    received = [answers.get(timeout=30) for _ in range(expected)]
    user.stop_stream()
    assert answers.empty()
    return received


def test_decoupled_model_streams_over_grpc(server: RunningServer) -> None:
    received = stream_repeat(server, [4, 5, 6])
    assert [error for _, error in received] == [None, None, None]
    assert [int(r.as_numpy("OUT")[0]) for r, _ in received] == [4, 5, 6]
    assert [int(r.as_numpy("IDX")[0]) for r, _ in received] == [0, 1, 2]
    assert {r.get_response().id for r, _ in received} == {"s-1"}


def test_a_decoupled_model_asked_for_one_response_gets_tritons_error(
    client, server: RunningServer
) -> None:
    """HTTP's infer and gRPC's ModelInfer refuse a decoupled model in Triton's words."""
    values = np.array([1, 2], dtype=np.int32)
    with pytest.raises(InferenceServerException) as http_error:
        client.infer("repeat", [tensor(httpclient, "IN", values, "INT32")])
    assert http_error.value.status() == "501"
    assert http_error.value.message() == (
        "HTTP end point doesn't support models with decoupled transaction policy"
    )
    user = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        with pytest.raises(InferenceServerException) as grpc_error:
            user.infer("repeat", [tensor(grpcclient, "IN", values, "INT32")])
    finally:
        user.close()
    assert grpc_error.value.status() == "StatusCode.UNIMPLEMENTED"
    assert grpc_error.value.message() == (
        "ModelInfer RPC doesn't support models with decoupled transaction policy"
    )


def test_decoupled_final_flag_comes_as_an_empty_response_when_asked(server) -> None:
    received = stream_repeat(server, [1, 2], empty_final=True)
    flags = [r.get_response().parameters["triton_final_response"].bool_param for r, _ in received]
    assert flags == [False, False, True]
    assert not received[-1][0].get_response().outputs


def test_decoupled_error_responses_do_not_end_the_stream(server: RunningServer) -> None:
    received = stream_repeat(server, [7, 8, 9], fail_at=1)
    assert received[0][1] is None and received[2][1] is None
    assert isinstance(received[1][1], InferenceServerException)
    assert "failed at 1" in str(received[1][1])
    assert [int(r.as_numpy("OUT")[0]) for r, e in received if e is None] == [7, 9]


def test_async_decoupled_executes_overlap_and_see_cancellation(server: RunningServer) -> None:
    """Two streams on one instance tick side by side; cancelling them reaches the model."""
    streams = []
    for tag in ("a", "b"):
        answers: queue.Queue = queue.Queue()
        user = grpcclient.InferenceServerClient(server.grpc_url)
        user.start_stream(callback=lambda result, error, answers=answers: answers.put(result))
        name = np.array([tag.encode()], dtype=np.object_)
        user.async_stream_infer("ticker", [tensor(grpcclient, "TAG", name, "BYTES")])
        streams.append((user, answers))
    for _, answers in streams:  # both tick while the other is still running
        counts = [int(answers.get(timeout=10).as_numpy("COUNT")[0]) for _ in range(3)]
        assert counts == [0, 1, 2]
    for user, _ in streams:
        user.stop_stream(cancel_requests=True)
    deadline = time.monotonic() + 10
    while server.log().count("cancelled after") < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "ticker a cancelled after" in server.log()
    assert "ticker b cancelled after" in server.log()


def test_decoupled_requests_batch_together_and_keep_their_own_streams(server) -> None:
    answers: queue.Queue = queue.Queue()
    user = grpcclient.InferenceServerClient(server.grpc_url)
    user.start_stream(callback=lambda result, error: answers.put((result, error)))
    for value in (0, 10, 20):
        array = np.array([[value]], dtype=np.int32)
        user.async_stream_infer(
            "repeat_batched", [tensor(grpcclient, "IN", array, "INT32")], request_id=str(value)
        )
    received = [answers.get(timeout=30) for _ in range(6)]
    user.stop_stream()
    assert [error for _, error in received] == [None] * 6
    seen = sorted(
        (r.get_response().id, int(r.as_numpy("OUT")[0][0]), int(r.as_numpy("BATCH")[0][0]))
        for r, _ in received
    )
    assert seen == [
        ("0", 0, 3),
        ("0", 1, 3),
        ("10", 10, 3),
        ("10", 11, 3),
        ("20", 20, 3),
        ("20", 21, 3),
    ]


def test_decoupled_model_streams_over_http_generate_stream(server: RunningServer) -> None:
    with requests.post(
        f"http://{server.url}/v2/models/repeat/generate_stream",
        json={"IN": [3, 1, 4]},
        stream=True,
        timeout=30,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [
            json.loads(line[len(b"data: ") :])
            for line in response.iter_lines()
            if line.startswith(b"data: ")
        ]
    assert [(e["OUT"], e["IDX"]) for e in events] == [(3, 0), (1, 1), (4, 2)]
    assert {e["model_name"] for e in events} == {"repeat"}


def test_a_client_that_leaves_generate_stream_cancels_it_quietly(server: RunningServer) -> None:
    """Leaving a server-sent event stream is routine: the model sees the cancellation, and the
    log has no error for it (it used to log the task's cancellation as a bug)."""
    with requests.post(
        f"http://{server.url}/v2/models/ticker/generate_stream",
        json={"TAG": "sse"},
        stream=True,
        timeout=30,
    ) as response:
        first = next(line for line in response.iter_lines() if line.startswith(b"data: "))
        assert json.loads(first[len(b"data: ") :])["COUNT"] == 0
    wait_for_log(server, "ticker sse cancelled after", 1)
    assert "unhandled error in the HTTP application" not in server.log()


def test_decoupled_model_refuses_a_plain_infer(client, grpc_client) -> None:
    inputs = [tensor(httpclient, "IN", np.array([1], dtype=np.int32), "INT32")]
    with pytest.raises(InferenceServerException, match="decoupled"):
        client.infer("repeat", inputs)
    inputs = [tensor(grpcclient, "IN", np.array([1], dtype=np.int32), "INT32")]
    with pytest.raises(InferenceServerException, match="decoupled"):
        grpc_client.infer("repeat", inputs)


def test_generate_answers_for_a_model_that_is_not_decoupled(server: RunningServer) -> None:
    response = requests.post(
        f"http://{server.url}/v2/models/add_sub/generate",
        json={"INPUT0": [1, 2, 3, 4], "INPUT1": [1, 1, 1, 1], "id": "g-1"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == "add_sub" and body["id"] == "g-1"
    assert body["OUTPUT0"] == [2, 3, 4, 5] and body["OUTPUT1"] == [0, 1, 2, 3]
    assert body["BATCH"] == 1
    bad = requests.post(
        f"http://{server.url}/v2/models/add_sub/generate",
        json={"INPUT0": [1, 2, 3], "INPUT1": [1, 1, 1, 1]},
        timeout=30,
    )
    assert bad.status_code == 400
    assert "can not convert input 'INPUT0' to tensor with proper shape" in bad.json()["error"]


# metrics and logs --------------------------------------------------------------------------------
def test_custom_metrics_appear_on_the_metrics_endpoint(client, server: RunningServer) -> None:
    totals = []
    for value in (0.5, 5.0, 50.0):
        array = np.array([value], dtype=np.float32)
        result = client.infer("metrics", [tensor(httpclient, "VALUE", array, "FP32")])
        totals.append(float(result.as_numpy("TOTAL")[0]))
    assert totals == [1.0, 2.0, 3.0]
    text = requests.get(server.metrics_url, timeout=10).text
    labels = '{model="metrics",version="1"}'
    assert f"opserve_test_requests{labels} 3.0" in text
    assert f"opserve_test_last_value{labels} 50.0" in text
    assert "# TYPE opserve_test_last_value gauge" in text
    assert 'opserve_test_values_bucket{le="1.0",model="metrics",version="1"} 1.0' in text
    assert 'opserve_test_values_bucket{le="10.0",model="metrics",version="1"} 2.0' in text
    assert 'opserve_test_values_bucket{le="+Inf",model="metrics",version="1"} 3.0' in text
    assert f"opserve_test_values_count{labels} 3.0" in text
    assert f"opserve_test_values_sum{labels} 55.5" in text


def test_model_log_lines_reach_the_server_log(client, server: RunningServer) -> None:
    array = np.array([7.0], dtype=np.float32)
    client.infer("metrics", [tensor(httpclient, "VALUE", array, "FP32")])
    deadline = time.monotonic() + 10
    while "metrics model saw 7.0" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = server.log()
    assert "metrics model initialized" in log
    line = next(line for line in log.splitlines() if "metrics model saw 7.0" in line)
    assert line.startswith("W") and "metrics (model.py:" in line  # the model's own line


# errors ------------------------------------------------------------------------------------------
def faulty(client, mode: str):
    array = np.array([mode.encode()], dtype=np.object_)
    return client.infer("faulty", [tensor(httpclient, "MODE", array, "BYTES")])


@pytest.mark.parametrize(
    ("mode", "status", "expected"),
    [
        ("raise", 500, "message: ZeroDivisionError: division by zero\n\nAt:\n"),
        (
            "too_many",
            500,
            "InferenceRequest(s) size is:1, and InferenceResponse(s) size is:2",
        ),
        (
            "wrong_type",
            500,
            "Expected an 'InferenceResponse' object in the execute function return list, "
            "found type '<class 'str'>'.",
        ),
        ("none", 500, "Expected a list in the execute return, found type '<class 'NoneType'>'."),
        ("error", 404, "no such thing"),
    ],
)
def test_a_faulty_model_gives_clear_errors(
    client, server: RunningServer, mode: str, status: int, expected: str
) -> None:
    with pytest.raises(InferenceServerException) as raised:
        faulty(client, mode)
    assert expected in raised.value.message()
    if status == 500:
        # no instance_group: Triton names the one instance `<model>_0`
        assert "Failed to process the request(s) for model 'faulty_0'" in raised.value.message()
    response = requests.post(
        f"http://{server.url}/v2/models/faulty/infer",
        json={"inputs": [{"name": "MODE", "datatype": "BYTES", "shape": [1], "data": [mode]}]},
        timeout=30,
    )
    assert response.status_code == status
    assert faulty(client, "ok").as_numpy("OUT")[0] > 0  # the model keeps serving


def wait_for_log(server: RunningServer, line: str, count: int, timeout: float = 30.0) -> None:
    """Until `line` shows `count` times in the server's log."""
    deadline = time.monotonic() + timeout
    while server.log().count(line) < count:
        assert time.monotonic() < deadline, f"{line!r} not {count} times in the log"
        time.sleep(0.05)


@pytest.mark.parametrize("model", ["faulty", "faulty_ensemble"])
@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_a_client_that_leaves_cancels_its_running_request(
    client, server: RunningServer, transport: str, model: str
) -> None:
    """A unary request whose client goes away while `execute` runs is cancelled for the model
    (`is_cancelled`): over HTTP the connection closes, over gRPC the call is cancelled. Through
    an ensemble, the step running then is cancelled, and the ensemble counts a failure (the
    step model, which answered, a success)."""
    waiting, cancelled = "faulty waits for a cancellation", "faulty cancelled=True"
    before = server.log().count(waiting), server.log().count(cancelled)
    failed = failures(client, model)
    mode = np.array([b"until_cancelled"], dtype=np.object_)
    if transport == "http":
        body = json.dumps(
            {
                "inputs": [
                    {"name": "MODE", "datatype": "BYTES", "shape": [1], "data": ["until_cancelled"]}
                ]
            }
        ).encode()
        host, port = server.url.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as connection:
            connection.sendall(
                b"POST /v2/models/%s/infer HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                % (model.encode(), len(body))
                + body
            )
            wait_for_log(server, waiting, before[0] + 1)
    else:
        user = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            call = user.async_infer(
                model, [tensor(grpcclient, "MODE", mode, "BYTES")], callback=lambda *_: None
            )
            wait_for_log(server, waiting, before[0] + 1)
            call.cancel()
        finally:
            user.close()
    wait_for_log(server, cancelled, before[1] + 1, timeout=20)
    if model == "faulty":  # the model answered (its answer has no one to go to): a success
        return
    deadline = time.monotonic() + 10
    while failures(client, model) != failed + 1:
        assert time.monotonic() < deadline, "the cancelled request was not counted as a failure"
        time.sleep(0.05)


def failures(client, model: str) -> int:
    """The failed requests in a model's statistics."""
    stats = client.get_inference_statistics(model)["model_stats"][0]["inference_stats"]
    return int(stats["fail"]["count"])


def worker_pid_once_serving(client, timeout: float = 30.0) -> int:
    """The pid of the faulty model's worker, once it answers again (after a restart)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return int(faulty(client, "ok").as_numpy("OUT")[0])
        except InferenceServerException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_a_model_may_answer_through_its_response_sender(client) -> None:
    assert faulty(client, "sender").as_numpy("OUT")[0] == faulty(client, "ok").as_numpy("OUT")[0]


def test_a_crashing_model_restarts_its_worker(client, server: RunningServer) -> None:
    before = int(faulty(client, "ok").as_numpy("OUT")[0])
    with pytest.raises(InferenceServerException, match="signal 6"):
        faulty(client, "crash")
    assert worker_pid_once_serving(client) != before
    inputs, a, b = add_sub_inputs(httpclient)
    np.testing.assert_array_equal(client.infer("add_sub", inputs).as_numpy("OUTPUT0"), a + b)


def test_a_hanging_model_times_out_and_restarts_its_worker(client) -> None:
    before = int(faulty(client, "ok").as_numpy("OUT")[0])
    array = np.array([b"hang"], dtype=np.object_)
    with pytest.raises(InferenceServerException, match="Request timeout expired"):
        client.infer("faulty", [tensor(httpclient, "MODE", array, "BYTES")], timeout=1_000_000)
    assert worker_pid_once_serving(client) != before


def test_a_warm_up_that_never_returns_is_bounded_by_the_load_timeout(tmp_path: Path) -> None:
    """Warm-up is part of a load: an execute that hangs there makes the model UNAVAILABLE once
    --model-load-timeout-secs has passed, its worker killed, instead of LOADING for ever."""
    repo = tmp_path / "repository"
    folder = place_python_model(repo, "faulty")
    (folder / "warmup").mkdir()
    (folder / "warmup" / "hang").write_bytes(len(b"hang").to_bytes(4, "little") + b"hang")
    with (folder / "config.pbtxt").open("a") as config:
        config.write(
            'model_warmup [ { name: "hangs" batch_size: 1 inputs { key: "MODE" value: '
            '{ data_type: TYPE_STRING dims: [ 1 ] input_data_file: "hang" } } } ]\n'
        )
    args = ["--model-control-mode", "explicit", "--model-load-timeout-secs", "3"]
    with RunningServer([repo], args) as running:
        user = httpclient.InferenceServerClient(running.url, network_timeout=60)
        started = time.monotonic()
        with pytest.raises(InferenceServerException, match="its warm-up did not finish within 3 s"):
            user.load_model("faulty")
        assert time.monotonic() - started < 30
        assert not user.is_model_ready("faulty")
        user.close()


def test_initialize_that_raises_leaves_the_model_unavailable(server: RunningServer) -> None:
    response = requests.get(f"http://{server.url}/v2/models/init_fails/ready", timeout=10)
    assert response.status_code == 400
    reason = response.json()["error"]
    assert "initialize failed: RuntimeError: the weights are missing" in reason
    assert "init_fails" in reason
    assert requests.get(f"http://{server.url}/v2/health/live", timeout=10).status_code == 200


# op libraries ------------------------------------------------------------------------------------
@requires("torch")
def test_model_operations_load_before_initialize(tmp_path: Path) -> None:
    repo = tmp_path / "repository"
    folder = place_python_model(repo, "torch_ops")
    build.copy_to(build.pytorch_my_ops(add_value=1.0), folder / "libmy_torch_ops.so")
    with RunningServer([repo]) as running:
        user = httpclient.InferenceServerClient(running.url)
        x = np.array([1.0, 2.0, 3.0], dtype=np.float32)
        result = user.infer("torch_ops", [tensor(httpclient, "INPUT0", x, "FP32")])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x + 1)
        metadata = user.get_model_metadata("torch_ops")
        assert metadata["op_libraries"] == [str((folder / "libmy_torch_ops.so").resolve())]


# lifecycle ---------------------------------------------------------------------------------------
def test_finalize_runs_at_unload(tmp_path: Path) -> None:
    repo = tmp_path / "repository"
    place_python_model(repo, "add_sub")
    with RunningServer([repo], ["--model-control-mode", "explicit"]) as running:
        user = httpclient.InferenceServerClient(running.url)
        user.load_model("add_sub")
        assert user.is_model_ready("add_sub")
        assert "add_sub finalized" not in running.log()
        user.unload_model("add_sub")
        deadline = time.monotonic() + 10
        while running.log().count("add_sub finalized") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert running.log().count("add_sub finalized") == 2  # both instances


def test_finalize_runs_when_the_server_stops(tmp_path: Path) -> None:
    """SIGTERM unloads every model before the server exits, as Triton's shutdown does."""
    repo = tmp_path / "repository"
    place_python_model(repo, "add_sub")
    running = RunningServer([repo])
    with running:
        assert httpclient.InferenceServerClient(running.url).is_model_ready("add_sub")
    assert running.process is not None and running.process.returncode == 0
    assert running.log().count("add_sub finalized") == 2


# execution environments --------------------------------------------------------------------------
def numpy_environment() -> Path:
    """A virtual environment with numpy and nothing of the server's (cached under .cache/)."""
    import subprocess
    import sys

    key = f"py{sys.version_info.major}{sys.version_info.minor}-numpy{np.__version__}"
    env = build.CACHE / "environments" / key
    if not (env / ".complete").exists():
        shutil.rmtree(env, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
        subprocess.run(
            [str(env / "bin" / "python"), "-m", "pip", "install", "-q", f"numpy=={np.__version__}"],
            check=True,
        )
        (env / ".complete").touch()
    return env


def with_probe_package(source: Path, target: Path, version: str) -> Path:
    """A copy of the environment holding `opserve_env_probe` at `version`."""
    shutil.copytree(source, target, symlinks=True)
    site = next((target / "lib").glob("python3*/site-packages"))
    (site / "opserve_env_probe").mkdir()
    (site / "opserve_env_probe" / "__init__.py").write_text(f'__version__ = "{version}"\n')
    return target


def test_each_python_model_runs_in_its_own_environment(tmp_path: Path) -> None:
    """Two models, two versions of one package that the server's environment does not have: a
    virtual environment folder, and the same packed as .tar.gz (unpacked once, cached)."""
    import importlib.util
    import tarfile

    assert importlib.util.find_spec("opserve_env_probe") is None
    base = numpy_environment()
    repo = tmp_path / "repository"
    folder_model = place_python_model(repo, "env_folder", "env_version")
    with_probe_package(base, folder_model / "env", "1.0")
    packed_model = place_python_model(repo, "env_packed", "env_version")
    staged = with_probe_package(base, tmp_path / "staged", "2.0")
    with tarfile.open(packed_model / "env.tar.gz", "w:gz", compresslevel=1) as tar:
        tar.add(staged, arcname=".")
    config = packed_model / "config.pbtxt"
    config.write_text(config.read_text().replace('/env"', '/env.tar.gz"'))
    cache = tmp_path / "cache"
    with RunningServer([repo], env={"OPSERVE_CACHE_DIR": str(cache)}) as running:
        user = httpclient.InferenceServerClient(running.url)
        x = tensor(httpclient, "X", np.array([0], dtype=np.int32), "INT32")
        folder_answer = user.infer("env_folder", [x])
        packed_answer = user.infer("env_packed", [x])
    assert folder_answer.as_numpy("VERSION")[0] == b"1.0"
    assert packed_answer.as_numpy("VERSION")[0] == b"2.0"
    executable = folder_answer.as_numpy("EXECUTABLE")[0].decode()
    assert executable.startswith(str(folder_model / "env"))
    unpacked = packed_answer.as_numpy("EXECUTABLE")[0].decode()
    assert unpacked.startswith(str(cache / "opserve" / "environments"))


def test_broken_loads_are_clear_errors(tmp_path: Path) -> None:
    """A missing environment, and an initialize that never returns (the load times out)."""
    repo = tmp_path / "repository"
    place_python_model(repo, "env_version")
    place_python_model(repo, "init_hangs")
    place_python_model(repo, "auto_complete")
    with RunningServer([repo], ["--model-load-timeout-secs", "3"]) as running:

        def reason(model: str) -> str:
            url = f"http://{running.url}/v2/models/{model}/ready"
            response = requests.get(url, timeout=10)
            assert response.status_code == 400
            return response.json()["error"]

        missing = reason("env_version")
        hung = reason("init_hangs")
        assert requests.get(f"http://{running.url}/v2/models/auto_complete/ready").ok
    assert "EXECUTION_ENV_PATH" in missing and "does not exist" in missing
    assert "did not finish loading in 3 s (--model-load-timeout-secs)" in hung


# the example repository --------------------------------------------------------------------------
def test_example_python_model_wraps_the_custom_op_model(example_server: RunningServer) -> None:
    """`shout`: Python pre- and post-processing around `text_ops` (onnxruntime-extensions ops),
    as the README's first curl lines show it."""
    response = requests.post(
        f"http://{example_server.url}/v2/models/shout/generate",
        json={"SENTENCE": "custom ops, with their model"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert response.json() == {
        "LETTERS": 23,
        "LONGEST": "CUSTOM",
        "SHOUTED": "CUSTOM OPS WITH THEIR MODEL!",
        "model_name": "shout",
        "model_version": "1",
    }


def test_check_knows_python_models(tmp_path: Path) -> None:
    import subprocess
    import sys

    repo = tmp_path / "repository"
    place_python_model(repo, "add_sub")
    place_python_model(repo, "env_version")
    place_python_model(repo, "auto_complete")  # completes its own tensors: partial is fine
    # what the server refuses at load, refused by check too
    inputs = 'input [ { name: "IN" data_type: TYPE_INT32 dims: [ 1 ] } ]\n'
    outputs = 'output [ { name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] } ]\n'
    for name, config in {
        "leaves_its_folder": f'default_model_filename: "../../add_sub/1/model.py"\n{inputs}{outputs}',
        "labels_missing": inputs
        + 'output [ { name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] label_filename: "l.txt" } ]',
        "input_twice": 'input [ { name: "IN" data_type: TYPE_INT32 dims: [ 1 ] },\n'
        '        { name: "IN" data_type: TYPE_INT32 dims: [ 1 ] } ]\n' + outputs,
        "no_data_type": 'input [ { name: "IN" dims: [ 1 ] } ]\n' + outputs,
    }.items():
        folder = place_python_model(repo, name, "add_sub")
        (folder / "config.pbtxt").write_text(f'name: "{name}"\nbackend: "python"\n{config}')
    result = subprocess.run(
        [sys.executable, "-m", "opserve", "check", "--model-repository", str(repo), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    report = {m["name"]: m for m in json.loads(result.stdout)["models"]}
    assert report["add_sub"]["problems"] == []
    assert report["auto_complete"]["problems"] == []
    assert any("EXECUTION_ENV_PATH" in p for p in report["env_version"]["problems"])
    for name, problem in {
        "leaves_its_folder": "leaves the model's folder",
        "labels_missing": "failed to open text file for read",
        "input_twice": "model input 'IN' is specified more than once",
        "no_data_type": "model input 'IN' must specify 'data_type'",
    }.items():
        assert any(problem in p for p in report[name]["problems"]), report[name]
