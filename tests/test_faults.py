"""Fault injection through a real server: a segfaulting op, a spinning op, a stopped (SIGSTOP)
worker, a failed restart of one of two instances, a restart while the server has no free file
descriptors, a load that never ends; and SIGTERM while all of that happens at once, and during
start-up. Every fault stays inside its model, heals (or is cancelled), and never keeps the server
from answering or from ending."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests import models
from tests.clients import simple_answers
from tests.conftest import SIMPLE_CONFIG, custom_op_config
from tests.oplibs import build
from tests.serving import RunningServer, children, eventually, free_port

PYTHON_MODELS = Path(__file__).resolve().parent / "python_models"

# two instances; `initialize` fails while the model folder holds a file named BROKEN
BREAKABLE_MODEL = """
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        if os.path.exists(os.path.join(args["model_repository"], "BROKEN")):
            raise RuntimeError("this instance cannot start: BROKEN is there")

    def execute(self, requests):
        pid = np.array([os.getpid()], dtype=np.int32)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("PID", pid)]) for _ in requests]
"""
BREAKABLE_CONFIG = """
backend: "python"
max_batch_size: 0
input [ { name: "X" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "PID" data_type: TYPE_INT32 dims: [ 1 ] } ]
instance_group [ { count: 2 kind: KIND_CPU } ]
"""
# the module's server restricts the repository API (load, unload, index) to holders of a key
KEY = {"admin-key": "secret"}
RESTRICTED = [
    "--http-restricted-api=model-repository:admin-key=secret",
    "--grpc-restricted-protocol=model-repository:admin-key=secret",
]
HANGING_LOAD = (PYTHON_MODELS / "init_hangs" / "model.py").read_text()
HANGING_CONFIG = (PYTHON_MODELS / "init_hangs" / "config.pbtxt").read_text()


def op_model(repo: Path, name: str, op: str, library: Path, extra: str = "") -> None:
    if "instance_group" not in extra:  # one worker, to follow (ONNX's default is two on CPU)
        extra += "instance_group [ { count: 1 kind: KIND_CPU } ]\n"
    folder = models.write_model(
        repo, name, models.custom_op(op), custom_op_config(name, "libmy_ops.so") + extra
    )
    build.copy_to(library, folder / "libmy_ops.so")


def python_model(repo: Path, name: str, source: str, config: str) -> Path:
    folder = models.write_model(repo, name, config=config)
    (folder / "1" / "model.py").write_text(source)
    return folder


def values(value: float) -> list[httpclient.InferInput]:
    tensor = httpclient.InferInput("INPUT0", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.full((1, 4), value, dtype=np.float32))
    return [tensor]


def workers_of(server: RunningServer, model: str) -> list[int]:
    """The worker processes serving `model` (their command line names it)."""
    assert server.process is not None
    found = []
    for pid in children(server.process.pid):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"opserve-worker:{model}:1".encode() in command:
            found.append(pid)
    return found


def running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def serving_again(
    server: RunningServer, client: httpclient.InferenceServerClient, model: str, gone: int
) -> bool:
    """A worker other than `gone` serves `model`, and the model is READY (a dead worker is a
    zombie until the server reaps it, and the model READY until the server has seen it)."""
    fresh = any(pid != gone and running(pid) for pid in workers_of(server, model))
    return fresh and client.is_model_ready(model)


def index_entry(client: httpclient.InferenceServerClient, name: str) -> dict[str, str]:
    return next(e for e in client.get_model_repository_index(headers=KEY) if e["name"] == name)


def http_post(url: str, body: dict[str, object] | None = None) -> tuple[int, dict[str, object]]:
    data = json.dumps(body or {}).encode()
    request = urllib.request.Request(url, data=data, method="POST", headers=KEY)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            text = response.read()
            return response.status, json.loads(text) if text else {}
    except urllib.error.HTTPError as error:
        text = error.read()
        try:
            return error.code, json.loads(text or b"{}")
        except ValueError:  # not JSON: a request cut short as the server stopped
            return error.code, {"error": text.decode(errors="replace")}
    except OSError as error:  # the server went away
        return 0, {"error": str(error)}


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory, my_ops_library: Path) -> Path:
    repo = tmp_path_factory.mktemp("faults") / "repository"
    models.write_model(repo, "simple", models.add_sub(), SIMPLE_CONFIG)
    op_model(repo, "segv", "Segfault", my_ops_library)
    op_model(
        repo,
        "spin",
        "Spin",
        my_ops_library,
        'parameters { key: "EXECUTION_TIMEOUT_SECS" value: { string_value: "1" } }\n',
    )
    op_model(repo, "fd_victim", "AddOne", my_ops_library)
    python_model(repo, "breakable", BREAKABLE_MODEL, BREAKABLE_CONFIG)
    python_model(repo, "hangs", HANGING_LOAD, HANGING_CONFIG)
    return repo


@pytest.fixture(scope="module")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    loads = [f"--load-model={n}" for n in ("simple", "segv", "spin", "fd_victim", "breakable")]
    log = tmp_path_factory.mktemp("faults-log") / "server.log"
    with RunningServer(
        [repository], ["--model-control-mode=explicit", *RESTRICTED, *loads], log_path=log
    ) as running_server:
        yield running_server


@pytest.fixture
def client(server: RunningServer) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(server.url)


def test_a_segfaulting_op_takes_down_only_its_worker(
    server: RunningServer, client: httpclient.InferenceServerClient
) -> None:
    (before,) = workers_of(server, "segv")
    with pytest.raises(InferenceServerException) as raised:
        client.infer("segv", values(-1.0))
    assert raised.value.status() == "500"
    assert "model 'segv' version 1" in raised.value.message()
    assert "SIGSEGV" in raised.value.message()
    assert simple_answers(client)
    eventually(lambda: client.is_model_ready("segv"), "segv READY again")
    assert client.infer("segv", values(2.0)).as_numpy("OUTPUT0").tolist() == [[2.0] * 4]
    assert workers_of(server, "segv") != [before]


def test_a_spinning_op_is_killed_after_the_execution_timeout(
    server: RunningServer, client: httpclient.InferenceServerClient
) -> None:
    (before,) = workers_of(server, "spin")
    with pytest.raises(InferenceServerException) as raised:
        client.infer("spin", values(-1.0))
    message = raised.value.message()
    assert raised.value.status() == "503", message
    assert "did not return within 1 s" in message and "EXECUTION_TIMEOUT_SECS" in message
    assert "killed and is being replaced" in message
    assert simple_answers(client)
    eventually(lambda: not running(before), "the spinning worker is gone")
    eventually(lambda: serving_again(server, client, "spin", before), "spin READY again")
    assert client.infer("spin", values(3.0)).as_numpy("OUTPUT0").tolist() == [[3.0] * 4]


def test_a_stopped_worker_is_presumed_hung_and_replaced(
    server: RunningServer, client: httpclient.InferenceServerClient
) -> None:
    eventually(lambda: client.is_model_ready("spin"), "spin READY")
    (stopped,) = workers_of(server, "spin")
    os.kill(stopped, signal.SIGSTOP)
    try:
        with pytest.raises(InferenceServerException) as raised:
            client.infer("spin", values(1.0))
        assert "did not return within 1 s" in raised.value.message()
        eventually(lambda: not running(stopped), "the stopped worker is gone")
    finally:
        if running(stopped):
            os.kill(stopped, signal.SIGCONT)
    eventually(lambda: serving_again(server, client, "spin", stopped), "spin READY again")
    assert client.infer("spin", values(4.0)).as_numpy("OUTPUT0").tolist() == [[4.0] * 4]
    assert "did not return within 1 s" in server.log()


def test_a_failed_restart_keeps_the_survivor_serving_and_is_retried(
    server: RunningServer, client: httpclient.InferenceServerClient, repository: Path
) -> None:
    marker = repository / "breakable" / "BROKEN"
    first, second = workers_of(server, "breakable")
    x = httpclient.InferInput("X", [1], "INT32")
    x.set_data_from_numpy(np.array([1], dtype=np.int32))
    marker.write_text("")
    try:
        os.kill(first, signal.SIGKILL)
        eventually(
            lambda: "failed (2 times)" in index_entry(client, "breakable")["reason"],
            "two failed restarts",
        )
        entry = index_entry(client, "breakable")
        assert entry["state"] == "READY", entry
        assert "BROKEN is there" in entry["reason"] and "trying again in" in entry["reason"]
        assert client.is_model_ready("breakable")
        answered = client.infer("breakable", [x]).as_numpy("PID").tolist()
        assert answered == [second]
        assert "restarting the worker of an instance failed (1 time)" in server.log()
    finally:
        marker.unlink()
    eventually(lambda: index_entry(client, "breakable")["reason"] == "", "both instances back")
    assert len(workers_of(server, "breakable")) == 2
    assert client.is_model_ready("breakable")


def test_a_worker_dying_while_no_fd_is_free_is_still_restarted(
    server: RunningServer, client: httpclient.InferenceServerClient
) -> None:
    assert server.process is not None
    pid = server.process.pid
    (victim,) = workers_of(server, "fd_victim")
    limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    open_now = len(os.listdir(f"/proc/{pid}/fd"))
    # fewer than are open: the dead worker's descriptors do not make room for a new one
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (open_now // 2, limits[1]))
    try:
        os.kill(victim, signal.SIGKILL)
        eventually(
            lambda: "cannot start a worker process for model 'fd_victim'" in server.log(),
            "a failed restart for want of file descriptors",
        )
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
    assert "Too many open files" in server.log()
    eventually(lambda: client.is_model_ready("fd_victim"), "fd_victim READY again")
    assert client.infer("fd_victim", values(1.0)).as_numpy("OUTPUT0").tolist() == [[2.0] * 4]
    assert simple_answers(client)


def test_unload_cancels_a_load_that_never_ends(
    server: RunningServer, client: httpclient.InferenceServerClient
) -> None:
    answers: list[tuple[int, dict[str, object]]] = []
    loading = threading.Thread(
        target=lambda: answers.append(
            http_post(f"http://{server.url}/v2/repository/models/hangs/load")
        )
    )
    loading.start()
    eventually(lambda: workers_of(server, "hangs"), "the hanging load's worker")
    (worker,) = workers_of(server, "hangs")
    assert index_entry(client, "hangs")["state"] == "LOADING"
    assert simple_answers(client)
    client.unload_model("hangs", headers=KEY)
    loading.join(timeout=60)
    (status, body) = answers[0]
    assert status == 400 and "was unloaded while it loaded" in str(body["error"]), body
    assert not running(worker)
    assert not client.is_model_ready("hangs")


def test_a_config_override_cannot_name_a_file_outside_the_model_folder(
    server: RunningServer, client: httpclient.InferenceServerClient
) -> None:
    for path in ("../../../../../../etc/passwd", "/etc/passwd"):
        config = {"backend": "onnxruntime", "default_model_filename": path}
        with pytest.raises(InferenceServerException) as raised:
            client.load_model("simple", config=json.dumps(config), headers=KEY)
        assert "default_model_filename" in raised.value.message()
        assert "leaves the model's folder" in raised.value.message()
    # a name of another model: the override is at fault, not the folder's config.pbtxt
    with pytest.raises(InferenceServerException) as raised:
        client.load_model("simple", config=json.dumps({"name": "other"}), headers=KEY)
    assert "model name 'other' in the load request's 'config' parameter" in raised.value.message()
    assert simple_answers(client)  # the loaded model keeps serving


def test_load_and_unload_need_the_key_of_the_restricted_repository_api(
    server: RunningServer, client: httpclient.InferenceServerClient
) -> None:
    for call in (client.load_model, client.unload_model):
        with pytest.raises(InferenceServerException) as refused:
            call("simple", headers={"admin-key": "wrong"})
        assert refused.value.status() == "403"
        assert "This API is restricted, expecting header 'admin-key'" in refused.value.message()
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    for grpc_call in (grpc.load_model, grpc.unload_model):
        with pytest.raises(InferenceServerException) as denied:
            grpc_call("simple")
        assert denied.value.status() == "StatusCode.PERMISSION_DENIED"
    grpc.load_model("simple", headers=KEY)  # a reload, with the key
    grpc.close()
    assert simple_answers(client)


def test_sigterm_ends_the_server_amid_every_fault_and_leaves_no_worker(
    repository: Path, tmp_path: Path
) -> None:
    loads = [f"--load-model={n}" for n in ("simple", "segv", "spin", "breakable")]
    marker = repository / "breakable" / "BROKEN"
    with RunningServer(
        [repository],
        ["--model-control-mode=explicit", "--exit-timeout-secs=2", *RESTRICTED, *loads],
        log_path=tmp_path / "log",
    ) as server:
        client = httpclient.InferenceServerClient(server.url, concurrency=4)
        assert server.process is not None
        workers = set(children(server.process.pid))
        marker.write_text("")
        try:
            os.kill(workers_of(server, "breakable")[0], signal.SIGKILL)  # restarts that fail
            os.kill(workers_of(server, "simple")[0], signal.SIGSTOP)  # a hung worker
            spinning = client.async_infer("spin", values(-1.0))  # an op that spins
            with pytest.raises(InferenceServerException):
                client.infer("segv", values(-1.0))  # a segfault, then a restart
            threading.Thread(
                target=http_post,
                args=(f"http://{server.url}/v2/repository/models/hangs/load",),
                daemon=True,
            ).start()  # a load that never ends (its answer comes as the server stops)
            eventually(lambda: workers_of(server, "hangs"), "the hanging load's worker")
            eventually(lambda: "trying again in" in server.log(), "a failed restart")
            workers |= set(children(server.process.pid))
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(timeout=60) == 0, server.log()
        finally:
            marker.unlink()
        del spinning
    eventually(lambda: not any(running(pid) for pid in workers), "every worker ended", 10)


def test_a_load_that_never_ends_does_not_hold_up_the_others_at_start_up(
    repository: Path, tmp_path: Path
) -> None:
    """Mode none: after --startup-wait-secs, HTTP and gRPC serve the models that loaded; the
    hanging one stays LOADING; SIGTERM then ends the server and the hanging worker."""
    repo = tmp_path / "repository"
    models.write_model(repo, "simple", models.add_sub(), SIMPLE_CONFIG)
    python_model(repo, "hangs", HANGING_LOAD, HANGING_CONFIG)
    with RunningServer(
        [repo], ["--startup-wait-secs=1", "--exit-timeout-secs=2"], log_path=tmp_path / "log"
    ) as server:
        client = httpclient.InferenceServerClient(server.url)
        eventually(lambda: client.is_model_ready("simple"), "simple READY")
        assert simple_answers(client)
        assert grpcclient.InferenceServerClient(server.grpc_url).is_model_ready("simple")
        assert index_entry(client, "hangs")["state"] == "LOADING"
        assert not client.is_server_ready()  # strict readiness: not every model is READY
        (worker,) = workers_of(server, "hangs")
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0, server.log()
    eventually(lambda: not running(worker), "the hanging worker ended", 10)


def _workers(pid: int) -> set[int]:
    """The model workers among the processes `pid` started (not a passing helper process)."""
    found = set()
    for child in children(pid):
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"opserve.workers.main" in command:
            found.add(child)
    return found


def test_sigterm_during_start_up_ends_the_server_and_its_workers(tmp_path: Path) -> None:
    repo = tmp_path / "repository"
    python_model(repo, "hangs", HANGING_LOAD, HANGING_CONFIG)
    log = tmp_path / "log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "opserve",
                "serve",
                "--model-repository",
                str(repo),
                "--http-address=127.0.0.1",
                f"--http-port={free_port()}",
                "--grpc-address=127.0.0.1",
                f"--grpc-port={free_port()}",
                "--metrics-address=127.0.0.1",
                f"--metrics-port={free_port()}",
                "--exit-timeout-secs=2",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        eventually(lambda: _workers(process.pid), "the hanging load's worker")
        workers = _workers(process.pid)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
    assert "stopped during start-up" in log.read_text()
    eventually(lambda: not any(running(pid) for pid in workers), "every worker ended", 10)
