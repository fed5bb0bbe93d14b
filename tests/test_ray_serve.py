"""opserve on Ray Serve (`opserve.ray`): a real local Ray cluster (loopback, no dashboard) serves
a custom-op model with two replicas behind the V2 ingress, queried with tritonclient over
Serve's HTTP port; one replica's process is killed under load and the deployment recovers.

One cluster and one application for the whole module: starting Ray costs seconds."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests import models
from tests.conftest import custom_op_config
from tests.oplibs import build
from tests.serving import free_port

ray = pytest.importorskip("ray", reason="Ray Serve is the opserve[ray] extra")
serve = pytest.importorskip("ray.serve")

APP = "opserve"
MODEL = "add_one"
RECOVERY_S = 90.0  # bound on waiting for Serve to replace a killed replica


@pytest.fixture(scope="module")
def serve_url(tmp_path_factory: pytest.TempPathFactory, my_ops_library: Path) -> Iterator[str]:
    from opserve.ray import app

    repo = tmp_path_factory.mktemp("ray") / "repository"
    # requests wait in a replica's batcher (up to 200 ms for a batch of 4), so that a replica
    # killed under load holds requests that the ingress must send again
    config = custom_op_config(MODEL, "libmy_ops.so") + (
        "instance_group [ { count: 2 } ]\n"
        "dynamic_batching { preferred_batch_size: [ 4 ] max_queue_delay_microseconds: 200000 }\n"
    )
    folder = models.write_model(repo, MODEL, models.custom_op(), config)
    build.copy_to(my_ops_library, folder / "libmy_ops.so")
    port = free_port()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(
            num_cpus=3,  # two model replicas (one CPU each) and the ingress (none)
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
        )
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            # a dead replica is noticed at its next health check: checked every second here
            health = {"health_check_period_s": 1, "health_check_timeout_s": 10}
            application = app({"model_repository": str(repo), "options": {MODEL: health}})
            serve.run(application, name=APP, route_prefix="/")
            yield f"127.0.0.1:{port}"
        finally:
            ray.shutdown()  # the cluster this module started, Serve's actors with it


@pytest.fixture(scope="module")
def client(serve_url: str) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(serve_url)


def add_one(client: httpclient.InferenceServerClient, binary: bool = True) -> np.ndarray:
    data = np.arange(8, dtype=np.float32).reshape(2, 4)
    tensor = httpclient.InferInput("INPUT0", [2, 4], "FP32")
    tensor.set_data_from_numpy(data, binary_data=binary)
    output = httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)
    result = client.infer(MODEL, [tensor], outputs=[output])
    answer = result.as_numpy("OUTPUT0")
    assert answer is not None
    np.testing.assert_array_equal(answer, data + 1)  # AddOne, from the model's own library
    return answer


def raw_infer(serve_url: str, value: float) -> tuple[str, list[float], bool]:
    """One JSON inference: the replica that answered (its header), the output, and whether
    the ingress had to send it again (a replica died under it)."""
    body = {
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [value] * 4}]
    }
    request = urllib.request.Request(
        f"http://{serve_url}/v2/models/{MODEL}/infer", data=json.dumps(body).encode()
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.loads(response.read())
        resent = response.headers.get("opserve-attempts") is not None
        return response.headers["opserve-replica"], answer["outputs"][0]["data"], resent


def test_tritonclient_works_against_serves_http_port(client: httpclient.InferenceServerClient):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL)
    metadata = client.get_model_metadata(MODEL)
    assert metadata["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 4]}]
    assert [Path(p).name for p in metadata["op_libraries"]] == ["libmy_ops.so"]
    # each replica hosts one instance: Serve's replicas are the config's instances
    groups = client.get_model_config(MODEL)["instance_group"]
    assert [g["count"] for g in groups] == [1]
    add_one(client, binary=True)
    add_one(client, binary=False)
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]


def test_errors_come_back_in_v2_form_with_tritons_codes(client: httpclient.InferenceServerClient):
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata("no_such_model")
    assert unknown.value.status() == "404"
    assert "Request for unknown model: 'no_such_model' is not found" in str(unknown.value)
    wrong = httpclient.InferInput("INPUT0", [2, 3], "FP32")
    wrong.set_data_from_numpy(np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(InferenceServerException) as refused:
        client.infer(MODEL, [wrong])
    assert refused.value.status() == "400"
    assert "INPUT0" in str(refused.value)
    with pytest.raises(InferenceServerException) as unsupported:
        client.get_system_shared_memory_status()
    assert unsupported.value.status() == "501"


def concurrently(serve_url: str, count: int) -> set[str]:
    """`count` inferences at once; the replicas that answered."""
    answered: list[str] = []
    threads = [
        threading.Thread(target=lambda: answered.append(raw_infer(serve_url, 1.0)[0]))
        for _ in range(count)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(answered) == count
    return set(answered)


def test_requests_spread_over_both_replicas(serve_url: str) -> None:
    replicas = concurrently(serve_url, 8) | concurrently(serve_url, 8)
    assert len(replicas) == 2, replicas


def replica_pids() -> list[int]:
    """The processes of the model's replicas (Ray titles them `ray::ServeReplica:APP:MODEL`)."""
    title = f"ServeReplica:{APP}:{MODEL}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if title in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def running_replicas() -> int:
    status = serve.status().applications[APP].deployments[MODEL]
    return status.replica_states.get("RUNNING", 0)


def test_a_killed_replica_loses_no_request_and_is_replaced(serve_url: str) -> None:
    """Kill a replica's process under load (again, at most three times, until a killed replica
    held requests: the ingress sends those again); every request is answered, right, and the
    deployment is back to two replicas, a new one among them."""
    known = concurrently(serve_url, 8)
    failures: list[BaseException] = []
    answers: list[tuple[str, bool]] = []
    stop = threading.Event()

    def load(offset: float) -> None:
        for count in range(1, 2000):  # bounded, whatever happens
            if stop.is_set():
                return
            try:
                replica, output, resent = raw_infer(serve_url, offset + count)
            except (urllib.error.URLError, OSError) as exc:
                failures.append(exc)
                continue
            if output != [offset + count + 1] * 4:
                failures.append(AssertionError(f"wrong answer {output}"))
            answers.append((replica, resent))

    def wait_for(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + RECOVERY_S
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.1)

    threads = [threading.Thread(target=load, args=(1000.0 * i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    killed: list[int] = []
    try:
        for _ in range(3):
            served = len(answers)
            wait_for(lambda: len(answers) >= served + 10)  # noqa: B023
            pids = replica_pids()
            assert len(pids) == 2, pids
            os.kill(pids[0], signal.SIGKILL)  # a crash, as the OOM killer would do it
            killed.append(pids[0])
            served = len(answers)

            def recovered() -> bool:
                new = {r for r, _ in answers[served:]} - known  # noqa: B023
                pids = replica_pids()
                return bool(new) and len(pids) == 2 and running_replicas() == 2

            wait_for(recovered)
            known |= {r for r, _ in answers}
            if any(resent for _, resent in answers):
                break
        served = len(answers)  # both replicas serve again (Serve's router may favour one a while)
        wait_for(lambda: len({r for r, _ in answers[served:]}) == 2)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert not failures, failures[:3]
    assert any(resent for _, resent in answers), "no killed replica held a request"
    assert running_replicas() == 2
    assert not set(killed) & set(replica_pids())
    assert len({r for r, _ in answers[served:]}) == 2  # both replicas serve again
