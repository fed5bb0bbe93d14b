"""`--shared-workers`: plain framework models share one worker process per backend; a model with
op libraries (or that opts out) keeps processes of its own; loading and unloading one model never
interrupts the others in the shared worker; a crash of it restarts every model it held."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests import models
from tests.conftest import custom_op_config
from tests.oplibs import build
from tests.serving import RunningServer, children, mapped

IDENTITY = 'backend: "onnxruntime"\nmax_batch_size: 8\n'
OPT_OUT = IDENTITY + 'parameters { key: "SHARED_WORKER" value { string_value: "false" } }\n'


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, my_ops_library: Path
) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("shared") / "repository"
    for name in ("a", "b"):
        models.write_model(repo, name, models.identity(), IDENTITY)
    models.write_model(repo, "own", models.identity(), OPT_OUT)
    folder = models.write_model(
        repo, "ops", models.custom_op("AddOne"), custom_op_config("ops", "libmy_ops.so")
    )
    build.copy_to(my_ops_library, folder / "libmy_ops.so")
    arguments = ["--shared-workers", "--model-control-mode=explicit", "--load-model=*"]
    with RunningServer([repo], arguments, log_path=repo.parent / "log") as running:
        yield running


def workers(server: RunningServer) -> dict[str, set[int]]:
    """The server's worker processes by title (`shared-onnxruntime`, `<model>:<version>`)."""
    assert server.process is not None
    titles: dict[str, set[int]] = {}
    for pid in children(server.process.pid):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for part in command:
            if part.startswith(b"opserve-worker:"):
                titles.setdefault(part.decode().removeprefix("opserve-worker:"), set()).add(pid)
    return titles


def shared_pid(server: RunningServer) -> int:
    (pid,) = workers(server)["shared-onnxruntime"]
    return pid


def ask(client: httpclient.InferenceServerClient, model: str, value: float = 1.0) -> np.ndarray:
    name, shape = ("INPUT0", [1, 4]) if model == "ops" else ("INPUT0", [1, 16])
    tensor = httpclient.InferInput(name, shape, "FP32")
    tensor.set_data_from_numpy(np.full(shape, value, dtype=np.float32))
    return client.infer(model, [tensor]).as_numpy("OUTPUT0")


def test_plain_models_share_one_worker_and_models_with_op_libraries_keep_their_own(
    server: RunningServer,
) -> None:
    client = httpclient.InferenceServerClient(server.url)
    for model in ("a", "b", "own"):
        assert ask(client, model, 3.0).tolist() == [[3.0] * 16]
    assert ask(client, "ops", 1.0).tolist() == [[2.0] * 4]
    titles = workers(server)
    # a and b (2 instances each) in one process; the opted-out model and the model with an op
    # library in one process per instance, as without sharing
    assert len(titles["shared-onnxruntime"]) == 1
    assert len(titles["own:1"]) == 2 and len(titles["ops:1"]) == 2
    assert set(titles) == {"shared-onnxruntime", "own:1", "ops:1"}
    # the op library is loaded by its model's workers only
    assert all(mapped(pid, "libmy_ops") for pid in titles["ops:1"])
    assert not mapped(shared_pid(server), "libmy_ops")
    config = client.get_model_config("a")
    assert sum(g["count"] for g in config["instance_group"]) == 2
    stats = client.get_inference_statistics("a")["model_stats"][0]["inference_stats"]
    assert stats["success"]["count"] >= 1


def test_loading_and_unloading_a_model_never_interrupts_the_others(server: RunningServer) -> None:
    shared = shared_pid(server)
    answered, failures = [0], []
    stop = threading.Event()

    def keep_asking() -> None:
        client = httpclient.InferenceServerClient(server.url, network_timeout=30)
        while not stop.is_set():
            try:
                assert ask(client, "a", 5.0).tolist() == [[5.0] * 16]
                answered[0] += 1
            except Exception as exc:  # noqa: BLE001 - every failure is the test's finding
                failures.append(exc)

    streams = [threading.Thread(target=keep_asking) for _ in range(2)]
    for thread in streams:
        thread.start()
    try:
        client = httpclient.InferenceServerClient(server.url)
        for _ in range(3):
            client.unload_model("b")
            assert not client.is_model_ready("b")
            with pytest.raises(InferenceServerException):
                ask(client, "b")
            client.load_model("b")
            assert ask(client, "b", 7.0).tolist() == [[7.0] * 16]
            assert shared_pid(server) == shared  # b came back into the same process
    finally:
        stop.set()
        for thread in streams:
            thread.join()
    assert failures == []
    assert answered[0] > 0


def test_a_crash_of_the_shared_worker_restarts_all_its_models(server: RunningServer) -> None:
    client = httpclient.InferenceServerClient(server.url, network_timeout=30)
    before = workers(server)
    shared = shared_pid(server)
    success = client.get_inference_statistics("a")["model_stats"][0]["inference_stats"]
    os.kill(shared, signal.SIGKILL)
    # while it restarts, a request fails with an error that says why (or, once back, is
    # answered); it never hangs (the client's timeout would raise a different error)
    errors = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            ask(client, "a")
            if ask(client, "b").size and client.is_model_ready("a") and client.is_model_ready("b"):
                break
        except InferenceServerException as exc:
            errors.append(str(exc))
        time.sleep(0.05)
    else:
        pytest.fail(f"the shared models did not come back: {errors[-3:]}")
    assert all(
        "restarting" in e or "was killed by signal 9" in e or "not ready" in e or "is ending" in e
        for e in errors
    ), errors
    after = workers(server)
    assert shared_pid(server) != shared
    # the models in processes of their own were not touched
    assert after["own:1"] == before["own:1"] and after["ops:1"] == before["ops:1"]
    assert ask(client, "own", 2.0).tolist() == [[2.0] * 16]
    assert ask(client, "a", 4.0).tolist() == [[4.0] * 16]
    now = client.get_inference_statistics("a")["model_stats"][0]["inference_stats"]
    assert now["success"]["count"] > success["success"]["count"]
    assert "the models sharing the onnxruntime worker was killed by signal 9" in server.log()
