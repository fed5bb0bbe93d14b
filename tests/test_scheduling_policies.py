"""Triton's scheduling policies beyond batching: priority levels and queue policies, warm-up."""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from opserve.datatypes import serialize_bytes
from tests import models
from tests.serving import RunningServer
from tests.test_python_models import place_python_model


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("policies") / "repository"
    place_python_model(repo, "ordered")
    place_warmup_models(repo)
    models.write_model(repo, "preferred", models.identity(), PREFERRED)
    folder = place_python_model(repo, "cached", "ordered")
    with (folder / "config.pbtxt").open("a") as config:
        config.write("response_cache { enable: true }\n")
    cache = ["--cache-config", "local,size=1048576"]
    with RunningServer([repo], cache, log_path=repo.parent / "server.log") as running:
        yield running


def sleep_input(seconds: float) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("SLEEP", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.array([[seconds]], dtype=np.float32))
    return [tensor]


def wait_for_log(server: RunningServer, text: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in server.log():
        assert time.monotonic() < deadline, f"'{text}' never appeared in the server's log"
        time.sleep(0.02)


def test_priorities_and_queue_policies_decide_the_serving_order(server: RunningServer) -> None:
    """While one request runs, the queue serves level 1 first; at level 2 a request whose own
    timeout passed (DELAY) goes behind the punctual one; at level 3 one waiting past its
    level's timeout (REJECT) fails. (Triton: core/src/scheduler_utils.cc PriorityQueue.)"""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    answers: queue.Queue = queue.Queue()

    def send(tag: str, **kwargs) -> None:
        client.async_infer(
            "ordered",
            sleep_input(0.0),
            lambda result, error: answers.put((tag, result, error)),
            **kwargs,
        )

    client.async_infer(
        "ordered", sleep_input(1.5), lambda result, error: answers.put(("blocker", result, error))
    )
    wait_for_log(server, "ordered executes 0")  # the blocker runs: the others must queue
    send("delayed", timeout=100_000)  # level 2 (the default), its own timeout 0.1 s
    send("punctual")  # level 2
    send("rejected", priority=3)
    send("urgent", priority=1)
    results = dict(
        (tag, (result, error)) for tag, result, error in (answers.get(timeout=60) for _ in range(5))
    )
    _, error = results.pop("rejected")
    assert isinstance(error, InferenceServerException)
    assert (
        error.status() == "StatusCode.UNAVAILABLE" and "Request timeout expired" in error.message()
    )
    order = {tag: int(result.as_numpy("ORDER")[0, 0]) for tag, (result, _) in results.items()}
    assert order == {"blocker": 0, "urgent": 1, "punctual": 2, "delayed": 3}
    client.close()


def test_a_queued_http_request_whose_client_left_never_runs(server: RunningServer) -> None:
    """The HTTP protocol marks a request whose connection closed; the scheduler drops it when
    its turn comes instead of running it."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    answers: queue.Queue = queue.Queue()
    executed = server.log().count("ordered executes")
    client.async_infer(
        "ordered", sleep_input(1.0), lambda result, error: answers.put(("blocker", result, error))
    )
    wait_for_log(server, f"ordered executes {executed}")  # the blocker runs: the rest queue
    body = b'{"inputs":[{"name":"SLEEP","datatype":"FP32","shape":[1,1],"data":[0.0]}]}'
    with socket.create_connection(("127.0.0.1", server.port)) as gone:
        gone.sendall(
            b"POST /v2/models/ordered/infer HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body
        )
        time.sleep(0.3)  # read and queued behind the blocker; then the client leaves
    client.async_infer(
        "ordered", sleep_input(0.0), lambda result, error: answers.put(("after", result, error))
    )
    results = {
        tag: (result, error) for tag, result, error in (answers.get(timeout=60) for _ in range(2))
    }
    assert all(error is None for _, error in results.values())
    order = {tag: int(result.as_numpy("ORDER")[0, 0]) for tag, (result, _) in results.items()}
    assert order["after"] == order["blocker"] + 1  # nothing ran in between
    assert server.log().count("ordered executes") == executed + 2
    client.close()


# warm-up ------------------------------------------------------------------------------------------
WARMED = """
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]
model_warmup [
  { name: "zeros" batch_size: 2 count: 3
    inputs { key: "INPUT0" value { data_type: TYPE_FP32 dims: [ 16 ] zero_data: true } } },
  { name: "random" batch_size: 1
    inputs { key: "INPUT0" value { data_type: TYPE_FP32 dims: [ 16 ] random_data: true } } }
]
"""
WARM_FAILS = """
model_warmup [ { name: "boom" batch_size: 1
  inputs { key: "MODE" value { data_type: TYPE_STRING dims: [ 1 ] input_data_file: "raise.bin" } } } ]
"""
WARM_INVALID = """
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]
model_warmup [ { name: "short" batch_size: 1
  inputs { key: "INPUT0" value { data_type: TYPE_FP32 dims: [ 16 ] input_data_file: "short.bin" } } } ]
"""


def place_warmup_models(repo: Path) -> None:
    models.write_model(repo, "warmed", models.identity(), WARMED)
    folder = place_python_model(repo, "warm_fails", "faulty")
    with (folder / "config.pbtxt").open("a") as config:
        config.write(WARM_FAILS)
    (folder / "warmup").mkdir()
    (folder / "warmup" / "raise.bin").write_bytes(serialize_bytes([b"raise"]))
    folder = models.write_model(repo, "warm_invalid", models.identity(), WARM_INVALID)
    (folder / "warmup").mkdir()
    (folder / "warmup" / "short.bin").write_bytes(bytes(12))


def test_warm_up_runs_on_every_instance_before_ready_and_counts(server: RunningServer) -> None:
    stats = requests.get(f"http://{server.url}/v2/models/warmed/stats").json()["model_stats"][0]
    # two instances (Triton's default count for an onnxruntime CPU group), each warmed up
    assert (stats["execution_count"], stats["inference_count"]) == (8, 14)
    assert {b["batch_size"]: b["compute_infer"]["count"] for b in stats["batch_stats"]} == {
        1: 2,
        2: 6,
    }
    assert "warm-up sample 'zeros' (3 runs)" in server.log()


@pytest.mark.parametrize(
    "model, reason",
    [
        ("warm_fails", "failed to run warmup sample 'boom'"),
        ("warm_invalid", "warm-up sample 'short' is invalid: input_data_file"),
    ],
)
def test_a_failing_warm_up_makes_the_model_unavailable(
    server: RunningServer, model: str, reason: str
) -> None:
    response = requests.get(f"http://{server.url}/v2/models/{model}/ready")
    assert response.status_code == 400 and reason in response.json()["error"]


# response cache -----------------------------------------------------------------------------------
def test_identical_requests_are_answered_from_the_cache(server: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    first, again, other = (
        int(client.infer("cached", sleep_input(s)).as_numpy("ORDER")[0, 0])
        for s in (0.0, 0.0, 0.001)
    )
    assert (first, again, other) == (0, 0, 1)  # the repeat never reached the model
    stats = requests.get(f"http://{server.url}/v2/models/cached/stats").json()["model_stats"][0]
    inference = stats["inference_stats"]
    assert (inference["cache_hit"]["count"], inference["cache_miss"]["count"]) == (1, 2)
    assert inference["success"]["count"] == 3
    assert (stats["inference_count"], stats["execution_count"]) == (2, 2)
    metrics = requests.get(server.metrics_url).text
    assert 'nv_cache_num_hits_per_model{model="cached",version="1"} 1' in metrics
    assert 'nv_cache_num_misses_per_model{model="cached",version="1"} 2' in metrics
    client.close()


# the dynamic batcher's dispatch -------------------------------------------------------------------
PREFERRED = """
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]
dynamic_batching { preferred_batch_size: [ 2, 8 ] max_queue_delay_microseconds: 600000000 }
"""


def test_a_filled_preferred_size_is_sent_without_waiting_for_the_delay(
    server: RunningServer,
) -> None:
    """Two requests fill the preferred size 2: they run at once as one batch, although the
    largest preferred size is 8 and the delay ten minutes (Triton: dynamic_batch_scheduler.cc;
    qa/L0_batcher checks it)."""
    import tritonclient.http as httpclient

    def one() -> None:
        client = httpclient.InferenceServerClient(server.url, network_timeout=120)
        tensor = httpclient.InferInput("INPUT0", [1, 16], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 16), dtype=np.float32))
        client.infer("preferred", [tensor])

    threads = [threading.Thread(target=one) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = requests.get(f"http://{server.url}/v2/models/preferred/stats").json()
    batches = {
        b["batch_size"]: b["compute_infer"]["count"] for b in stats["model_stats"][0]["batch_stats"]
    }
    assert batches == {2: 1}
