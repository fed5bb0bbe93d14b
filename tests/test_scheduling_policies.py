"""Triton's scheduling policies beyond batching: priority levels and queue policies."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.serving import RunningServer
from tests.test_python_models import place_python_model


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("policies") / "repository"
    place_python_model(repo, "ordered")
    with RunningServer([repo], log_path=repo.parent / "server.log") as running:
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
