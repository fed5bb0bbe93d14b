"""Dynamic batching, instance groups and the bounded queue, seen through the statistics."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests import models
from tests.clients import infer_input
from tests.conftest import add_constant
from tests.oplibs import build
from tests.serving import RunningServer

BATCHED = """
backend: "onnxruntime"
max_batch_size: 8
dynamic_batching { max_queue_delay_microseconds: 300000 }
"""
BATCHED_VARIABLE = """
backend: "onnxruntime"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
dynamic_batching { max_queue_delay_microseconds: 300000 }
"""
SLOW = """
backend: "onnxruntime"
max_batch_size: 4
instance_group [ {{ count: {count} kind: KIND_CPU }} ]
model_operations {{ op_library_filename: "libmy_ops.so" }}
{extra}
"""


def slow_model(repo: Path, name: str, count: int, extra: str = "", op: str = "Slow") -> None:
    folder = models.write_model(
        repo, name, models.custom_op(op), SLOW.format(count=count, extra=extra)
    )
    build.copy_to(build.onnxruntime_my_ops(), folder / "libmy_ops.so")


@pytest.fixture(scope="module")
def scheduling_server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("scheduling") / "repository"
    models.write_model(repo, "batched", add_constant(1.0), BATCHED)
    variable = models.onnx_model(
        [models.helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        [models.tensor("INPUT0", "FP32", [None, None])],
        [models.tensor("OUTPUT0", "FP32", [None, None])],
    )
    models.write_model(repo, "batched_variable", variable, BATCHED_VARIABLE)
    slow_model(repo, "rendezvous_two_instances", 2, op="Rendezvous")
    slow_model(repo, "rendezvous_one_instance", 1, op="Rendezvous")
    slow_model(
        repo,
        "slow_small_queue",
        1,
        "dynamic_batching { max_queue_delay_microseconds: 0 default_queue_policy { max_queue_size: 2 } }",
    )
    slow_model(repo, "slow_queued", 1, "dynamic_batching { max_queue_delay_microseconds: 0 }")
    with RunningServer([repo], log_path=repo.parent / "server.log") as server:
        yield server


def stats(server: RunningServer, model: str) -> dict:
    return requests.get(f"http://{server.url}/v2/models/{model}/stats").json()["model_stats"][0]


def test_concurrent_requests_run_in_fewer_larger_batches(scheduling_server) -> None:
    def one(value: float) -> list[float]:
        client = httpclient.InferenceServerClient(scheduling_server.url)
        data = np.full((1, 4), value, dtype=np.float32)
        return (
            client.infer("batched", [infer_input("INPUT0", data, "FP32")])
            .as_numpy("OUTPUT0")
            .tolist()
        )

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    assert results == [[[v + 1.0] * 4] for v in range(8)]  # each request got its own answer
    counts = stats(scheduling_server, "batched")
    assert counts["inference_count"] == 8
    assert counts["inference_stats"]["success"]["count"] == 8
    assert counts["execution_count"] < 8  # fewer executions than requests...
    assert max(b["batch_size"] for b in counts["batch_stats"]) > 1  # ...because some were batched
    executed = sum(b["batch_size"] * b["compute_infer"]["count"] for b in counts["batch_stats"])
    assert executed == 8


def test_requests_of_different_shapes_are_not_merged(scheduling_server) -> None:
    def one(width: int) -> list[list[float]]:
        client = httpclient.InferenceServerClient(scheduling_server.url)
        data = np.arange(width, dtype=np.float32).reshape(1, width)
        return (
            client.infer("batched_variable", [infer_input("INPUT0", data, "FP32")])
            .as_numpy("OUTPUT0")
            .tolist()
        )

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, [2, 3, 2, 3]))
    assert results == [[list(range(w))] for w in (2, 3, 2, 3)]
    batch_sizes = {
        b["batch_size"] for b in stats(scheduling_server, "batched_variable")["batch_stats"]
    }
    assert batch_sizes <= {1, 2}  # at most the two requests of one width together, never all four


def slow_request(
    server: RunningServer, model: str, value: float = 1.0, timeout: float = 30.0
) -> float:
    client = httpclient.InferenceServerClient(
        server.url, network_timeout=timeout, connection_timeout=timeout
    )
    data = np.full((1, 4), value, dtype=np.float32)
    return float(
        client.infer(model, [infer_input("INPUT0", data, "FP32")]).as_numpy("OUTPUT0")[0, 0]
    )


def rendezvous(server: RunningServer, model: str, key: int) -> float:
    client = httpclient.InferenceServerClient(server.url, network_timeout=60)
    data = np.full((1, 4), float(key), dtype=np.float32)
    return float(
        client.infer(model, [infer_input("INPUT0", data, "FP32")]).as_numpy("OUTPUT0")[0, 0]
    )


@pytest.mark.parametrize(
    "model, met",
    [("rendezvous_two_instances", [1.0, 1.0]), ("rendezvous_one_instance", [0.0, 1.0])],
)
def test_two_instances_execute_two_requests_at_once(
    scheduling_server, model: str, met: list[float]
) -> None:
    """Two requests meet inside the op only if they execute at the same time; with one instance
    the first waits alone (the control that shows this test can fail)."""
    key = random.randrange(1, 2**23)  # exact as an FP32 value; names the meeting point
    try:
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda _: rendezvous(scheduling_server, model, key), range(2)))
    finally:
        Path(f"/dev/shm/opserve-rendezvous-{key}").unlink(missing_ok=True)
    assert sorted(answers) == met


def test_a_full_queue_fails_fast_with_unavailable(scheduling_server) -> None:
    def one(value: float) -> str:
        try:
            slow_request(scheduling_server, "slow_small_queue", value)
            return "ok"
        except InferenceServerException as exc:
            assert "Exceeds maximum queue size" in exc.message()
            return exc.status()

    with ThreadPoolExecutor(7) as pool:
        outcomes = list(pool.map(one, range(7)))
    # one executes, two wait in the queue, the rest are refused at once
    assert outcomes.count("ok") >= 3
    assert outcomes.count("503") >= 2
    assert set(outcomes) <= {"ok", "503"}


def test_a_request_whose_client_left_is_dropped(scheduling_server) -> None:
    before = stats(scheduling_server, "slow_queued")["execution_count"]
    with ThreadPoolExecutor(2) as pool:
        busy = pool.submit(slow_request, scheduling_server, "slow_queued", 1.0)
        time.sleep(0.05)  # the first request is executing; the next one waits in the queue
        impatient = pool.submit(slow_request, scheduling_server, "slow_queued", 2.0, 0.05)
        with pytest.raises(Exception):  # noqa: B017 - the client's own timeout, whatever its type
            impatient.result()
        assert busy.result() == 1.0
    time.sleep(0.5)  # time enough for the dropped request to have run, had it not been dropped
    assert slow_request(scheduling_server, "slow_queued", 3.0) == 3.0
    assert stats(scheduling_server, "slow_queued")["execution_count"] == before + 2
