"""Statistics in Triton's shape, Prometheus metrics with Triton's names, and repository polling."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests import models
from tests.clients import infer_input, simple_answers, simple_inputs
from tests.conftest import SIMPLE_CONFIG, add_constant
from tests.serving import RunningServer


def test_statistics_in_tritons_shape(client, server: RunningServer) -> None:
    before = client.get_inference_statistics("simple")["model_stats"][0]
    client.infer("simple", simple_inputs(batch=3)[2])
    bad = httpclient.InferInput("INPUT0", [1, 16], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 16), dtype=np.float32))
    try:
        client.infer("simple", [bad])
    except InferenceServerException:
        pass
    after = client.get_inference_statistics("simple")["model_stats"][0]
    assert after["name"] == "simple" and after["version"] == "1"
    assert after["inference_count"] == before["inference_count"] + 3
    assert after["execution_count"] == before["execution_count"] + 1
    success = after["inference_stats"]["success"]
    assert (
        success["count"] == before["inference_stats"]["success"]["count"] + 1 and success["ns"] > 0
    )
    for key in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert after["inference_stats"][key]["count"] == success["count"]
        assert after["inference_stats"][key]["ns"] >= before["inference_stats"][key]["ns"]
    assert after["last_inference"] >= before["last_inference"]
    batch3 = next(b for b in after["batch_stats"] if b["batch_size"] == 3)
    assert batch3["compute_infer"]["count"] >= 1
    everything = requests.get(f"http://{server.url}/v2/models/stats").json()["model_stats"]
    assert {"simple", "all_types"} <= {s["name"] for s in everything}
    one = requests.get(f"http://{server.url}/v2/models/simple/versions/1/stats").json()[
        "model_stats"
    ]
    assert [s["version"] for s in one] == ["1"]
    missing = requests.get(f"http://{server.url}/v2/models/nope/stats")
    assert missing.status_code == 404 and "error" in missing.json()


def metric(text: str, name: str, model: str) -> float:
    for line in text.splitlines():
        if line.startswith(f'{name}{{model="{model}",version="1"}}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} for {model} not found in:\n{text}")


def test_prometheus_metrics(client, server: RunningServer) -> None:
    before = requests.get(server.metrics_url).text
    client.infer("simple", simple_inputs(batch=2)[2])
    text = requests.get(server.metrics_url).text
    for name in (
        "nv_inference_request_success",
        "nv_inference_request_failure",
        "nv_inference_count",
        "nv_inference_exec_count",
        "nv_inference_request_duration_us",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_input_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_inference_compute_output_duration_us",
    ):
        assert f"# TYPE {name} " in text
    assert (
        metric(text, "nv_inference_request_success", "simple")
        == metric(before, "nv_inference_request_success", "simple") + 1
    )
    assert (
        metric(text, "nv_inference_count", "simple")
        == metric(before, "nv_inference_count", "simple") + 2
    )
    assert metric(text, "nv_inference_request_duration_us", "simple") > 0
    assert requests.get(server.metrics_url.replace("/metrics", "/other")).status_code == 404


def test_poll_mode_follows_the_repository(tmp_path: Path) -> None:
    repo = tmp_path / "repository"
    models.write_model(repo, "simple", models.add_sub(), SIMPLE_CONFIG)
    models.write_model(repo, "adds", add_constant(1.0), 'backend: "onnxruntime"\n')
    args = ["--model-control-mode", "poll", "--repository-poll-secs", "0.3"]
    with RunningServer([repo], args, log_path=tmp_path / "log") as server:
        client = httpclient.InferenceServerClient(server.url)
        failures: list[BaseException] = []
        stop = threading.Event()

        def keep_asking() -> None:  # requests to another model, all through the changes
            other = httpclient.InferenceServerClient(server.url)
            while not stop.is_set():
                try:
                    assert simple_answers(other)
                except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
                    failures.append(exc)

        asker = threading.Thread(target=keep_asking)
        asker.start()
        try:

            def added(model: str) -> float:
                data = np.zeros((1, 4), dtype=np.float32)
                return float(
                    client.infer(model, [infer_input("INPUT0", data, "FP32")]).as_numpy("OUTPUT0")[
                        0, 0
                    ]
                )

            def eventually(check, timeout: float = 30.0) -> None:
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    try:
                        if check():
                            return
                    except InferenceServerException:
                        pass
                    time.sleep(0.1)
                raise AssertionError(f"not within {timeout} s:\n{server.log()[-3000:]}")

            assert added("adds") == 1.0
            with pytest.raises(InferenceServerException) as refused:
                client.load_model("adds")
            assert (
                refused.value.status() == "503" and "polling is enabled" in refused.value.message()
            )
            models.write_model(repo, "appears", add_constant(7.0), 'backend: "onnxruntime"\n')
            eventually(lambda: client.is_model_ready("appears") and added("appears") == 7.0)
            models.write_model(
                repo, "adds", add_constant(2.0), 'backend: "onnxruntime"\n', versions=(2,)
            )
            eventually(lambda: added("adds") == 2.0)  # a new version: the latest serves
            shutil.rmtree(repo / "appears")
            eventually(
                lambda: "appears" not in {m["name"] for m in client.get_model_repository_index()}
            )
            assert not client.is_model_ready("appears")
        finally:
            stop.set()
            asker.join()
        assert not failures, failures[:3]
