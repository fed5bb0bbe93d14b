"""Ensembles (`platform: "ensemble"`) through a real server, over HTTP and gRPC.

One server (explicit model control, every model loaded at start) serves: a diamond of a Python
preprocessing step, our own ONNX Runtime custom op (AddOne) and the same Python model again,
joined by a Python postprocessing step; a decoupled step streaming through an ensemble; and
ensembles that cannot serve (a missing step model, a graph whose shapes disagree).
"""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from opserve.check import check_repository
from tests import models
from tests.conftest import custom_op_config
from tests.oplibs import build
from tests.serving import RunningServer
from tests.test_python_models import place_python_model, tensor, worker_pid_once_serving


def step(model: str, inputs: dict[str, str], outputs: dict[str, str], version: int = -1) -> str:
    mapped = "".join(f' input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items())
    mapped += "".join(f' output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items())
    return f'{{ model_name: "{model}" model_version: {version}{mapped} }}'


def ensemble(io: str, *steps: str, max_batch_size: int = 4) -> str:
    return (
        f'platform: "ensemble"\nmax_batch_size: {max_batch_size}\n{io}\n'
        f"ensemble_scheduling {{ step [ {', '.join(steps)} ] }}\n"
    )


VECTOR_IO = (
    'input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
    'output [ { name: "SUM" data_type: TYPE_FP32 dims: [ 4 ] },'
    ' { name: "DIFF" data_type: TYPE_FP32 dims: [ 4 ] } ]'
)

# X -> ens_scale -> pre; pre -> custom_add_one -> plus_one; pre -> ens_scale -> doubled;
# (plus_one, doubled) -> ens_join -> SUM = 6X + 1, DIFF = 1 - 2X
DIAMOND = ensemble(
    VECTOR_IO,
    step("ens_scale", {"X": "X"}, {"Y": "pre"}),
    step("custom_add_one", {"INPUT0": "pre"}, {"OUTPUT0": "plus_one"}),
    step("ens_scale", {"X": "pre"}, {"Y": "doubled"}),
    step("ens_join", {"A": "plus_one", "B": "doubled"}, {"SUM": "SUM", "DIFF": "DIFF"}),
)

# an ensemble as a step of another: Y = 2 * SUM = 12X + 2
NESTED = ensemble(
    'input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
    'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 4 ] } ]',
    step("ens_diamond", {"X": "X"}, {"SUM": "sum"}),
    step("ens_scale", {"X": "sum"}, {"Y": "Y"}),
)

CHAIN = ensemble(
    'input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
    'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 4 ] } ]',
    step("ens_scale_spare", {"X": "X"}, {"Y": "Y"}),
)

# the decoupled `repeat` answers once per element of IN; each answer goes through ens_tens
STREAM = ensemble(
    'input [ { name: "IN" data_type: TYPE_INT32 dims: [ -1 ] } ]\n'
    'output [ { name: "TENS" data_type: TYPE_INT32 dims: [ 1 ] },'
    ' { name: "IDX" data_type: TYPE_INT32 dims: [ 1 ] } ]',
    step("repeat", {"IN": "IN"}, {"OUT": "value", "IDX": "IDX"}),
    step("ens_tens", {"X": "value"}, {"Y": "TENS"}),
    max_batch_size=0,
)

# the same, where repeat's response FAIL_AT is an error
STREAM_FAILING = ensemble(
    'input [ { name: "IN" data_type: TYPE_INT32 dims: [ -1 ] },'
    ' { name: "FAIL_AT" data_type: TYPE_INT32 dims: [ 1 ] } ]\n'
    'output [ { name: "TENS" data_type: TYPE_INT32 dims: [ 1 ] } ]',
    step("repeat", {"IN": "IN", "FAIL_AT": "FAIL_AT"}, {"OUT": "value"}),
    step("ens_tens", {"X": "value"}, {"Y": "TENS"}),
    max_batch_size=0,
)

# a step model whose initialize raises
FAILED_STEP = ensemble(
    'input [ { name: "X" data_type: TYPE_INT32 dims: [ 1 ] } ]\n'
    'output [ { name: "Y" data_type: TYPE_INT32 dims: [ 1 ] } ]',
    step("init_fails", {"X": "X"}, {"Y": "Y"}),
    max_batch_size=0,
)

HANGING = ensemble(
    'input [ { name: "MODE" data_type: TYPE_STRING dims: [ 1 ] } ]\n'
    'output [ { name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] } ]',
    step("faulty", {"MODE": "MODE"}, {"OUT": "OUT"}),
    max_batch_size=0,
)

MISSING_STEP = ensemble(
    'input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
    'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 4 ] } ]',
    step("not_a_model", {"X": "X"}, {"Y": "Y"}),
)

# custom_add_one takes [4], the ensemble gives it [3]
BAD_SHAPE = ensemble(
    'input [ { name: "X" data_type: TYPE_FP32 dims: [ 3 ] } ]\n'
    'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 4 ] } ]',
    step("custom_add_one", {"INPUT0": "X"}, {"OUTPUT0": "Y"}),
)


@pytest.fixture(scope="module")
def repository(tmp_path_factory, my_ops_library: Path) -> Path:
    repo = tmp_path_factory.mktemp("ensembles") / "repository"
    for name in ("ens_scale", "ens_join", "ens_tens", "repeat", "faulty", "init_fails"):
        place_python_model(repo, name)
    place_python_model(repo, "ens_scale_spare", "ens_scale")
    io = (  # spelled out, so that `opserve check` can compare shapes without the model
        'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
    )
    config = custom_op_config("custom_add_one", "libmy_ops.so") + io
    folder = models.write_model(repo, "custom_add_one", models.custom_op(), config)
    build.copy_to(my_ops_library, folder / "libmy_ops.so")
    for name, config in (
        ("ens_diamond", DIAMOND),
        ("ens_chain", CHAIN),
        ("ens_nested", NESTED),
        ("ens_stream", STREAM),
        ("ens_stream_failing", STREAM_FAILING),
        ("ens_missing_step", MISSING_STEP),
        ("ens_hanging", HANGING),
        ("ens_failed_step", FAILED_STEP),
        ("ens_bad_shape", BAD_SHAPE),
    ):
        models.write_model(repo, name, None, f'name: "{name}"\n{config}')
    return repo


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[RunningServer]:
    args = ["--model-control-mode", "explicit", "--load-model", "*"]
    with RunningServer([repository], extra_args=args) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(server.url)


@pytest.fixture(scope="module")
def grpc_client(server: RunningServer) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(server.grpc_url)


def users(protocol: str, client, grpc_client):
    return (httpclient, client) if protocol == "http" else (grpcclient, grpc_client)


def statistics(client, name: str) -> dict:
    return client.get_inference_statistics(name)["model_stats"][0]


# serving ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_the_diamond_answers_exactly(client, grpc_client, protocol: str) -> None:
    module, user = users(protocol, client, grpc_client)
    x = np.array([[0.0, 1.5, 2.0, 10.0], [3.0, 4.0, 5.0, 6.0]], dtype=np.float32)
    result = user.infer("ens_diamond", [tensor(module, "X", x, "FP32")], request_id="d-1")
    np.testing.assert_array_equal(result.as_numpy("SUM"), 6 * x + 1)
    np.testing.assert_array_equal(result.as_numpy("DIFF"), 1 - 2 * x)
    response = result.get_response()
    if protocol == "http":
        assert response["model_name"] == "ens_diamond" and response["id"] == "d-1"
    else:
        assert response.model_name == "ens_diamond" and response.id == "d-1"


def test_an_ensemble_can_be_a_step_of_another(grpc_client) -> None:
    x = np.array([[0.0, 1.0, 2.0, 3.0]], dtype=np.float32)
    result = grpc_client.infer("ens_nested", [tensor(grpcclient, "X", x, "FP32")])
    np.testing.assert_array_equal(result.as_numpy("Y"), 12 * x + 2)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_only_the_requested_outputs_come_back(client, grpc_client, protocol: str) -> None:
    module, user = users(protocol, client, grpc_client)
    x = np.ones((1, 4), dtype=np.float32)
    result = user.infer(
        "ens_diamond",
        [tensor(module, "X", x, "FP32")],
        outputs=[module.InferRequestedOutput("DIFF")],
    )
    np.testing.assert_array_equal(result.as_numpy("DIFF"), 1 - 2 * x)
    assert result.as_numpy("SUM") is None


def test_metadata_and_index_show_an_ensemble(client) -> None:
    metadata = client.get_model_metadata("ens_diamond")
    assert metadata["platform"] == "ensemble"
    assert [i["name"] for i in metadata["inputs"]] == ["X"]
    assert [o["name"] for o in metadata["outputs"]] == ["SUM", "DIFF"]
    assert client.is_model_ready("ens_diamond")
    index = {e["name"]: e for e in client.get_model_repository_index()}
    assert index["ens_diamond"]["state"] == "READY"


def test_the_ensemble_inputs_are_validated_like_any_model(client) -> None:
    wrong = np.ones((1, 3), dtype=np.float32)
    with pytest.raises(InferenceServerException) as error:
        client.infer("ens_diamond", [tensor(httpclient, "X", wrong, "FP32")])
    assert "unexpected shape for input 'X' for model 'ens_diamond'" in error.value.message()
    with pytest.raises(InferenceServerException) as error:
        client.infer("ens_diamond", [tensor(httpclient, "X", np.ones((5, 4), np.float32), "FP32")])
    assert "batch-size must be <= 4" in error.value.message()


# errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_failing_step_fails_the_request_naming_it(client, grpc_client, protocol: str) -> None:
    module, user = users(protocol, client, grpc_client)
    x = np.array([[-1.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    with pytest.raises(InferenceServerException) as error:
        user.infer("ens_diamond", [tensor(module, "X", x, "FP32")])
    message = error.value.message()
    assert error.value.status() == ("500" if protocol == "http" else "StatusCode.INTERNAL")
    assert "in ensemble 'ens_diamond', step 0 (model 'ens_scale')" in message
    assert "ens_scale refuses negative input" in message


def test_a_missing_step_model_makes_the_ensemble_unavailable(client, grpc_client) -> None:
    assert not client.is_model_ready("ens_missing_step")
    index = {e["name"]: e for e in client.get_model_repository_index()}
    reason = (
        "ensemble ens_missing_step contains models that are not available or ambiguous: not_a_model"
    )
    assert index["ens_missing_step"]["state"] == "UNAVAILABLE"
    assert reason in index["ens_missing_step"]["reason"]
    x = np.ones((1, 4), dtype=np.float32)
    with pytest.raises(InferenceServerException) as error:
        client.infer("ens_missing_step", [tensor(httpclient, "X", x, "FP32")])
    assert error.value.status() == "503" and "not_a_model" in error.value.message()
    with pytest.raises(InferenceServerException) as error:
        grpc_client.infer("ens_missing_step", [tensor(grpcclient, "X", x, "FP32")])
    assert error.value.status() == "StatusCode.UNAVAILABLE"


def test_a_step_model_that_failed_to_load_is_named_with_its_error(client) -> None:
    index = {e["name"]: e for e in client.get_model_repository_index()}
    assert index["ens_failed_step"]["state"] == "UNAVAILABLE"
    reason = index["ens_failed_step"]["reason"]
    assert reason.startswith(
        "ensemble 'ens_failed_step' depends on 'init_fails' which has no loaded version. "
        "Model 'init_fails' loading failed with error: "
    )
    assert "the weights are missing" in reason


def test_an_invalid_graph_makes_the_ensemble_unavailable_with_the_reason(client) -> None:
    index = {e["name"]: e for e in client.get_model_repository_index()}
    assert index["ens_bad_shape"]["state"] == "UNAVAILABLE"
    assert (
        "in ensemble ens_bad_shape, ensemble tensor X: inconsistent shape: [-1,3] is inferred "
        "from model ens_bad_shape while [-1,4] is inferred from model custom_add_one"
    ) in index["ens_bad_shape"]["reason"]


def test_opserve_check_reports_the_broken_ensembles(repository: Path) -> None:
    report = {m.name: m for m in check_repository([repository]).models}
    assert report["ens_diamond"].ok and report["ens_stream"].ok, report
    assert report["ens_bad_shape"].problems == [
        "in ensemble ens_bad_shape, ensemble tensor X: inconsistent shape: [-1,3] is inferred "
        "from model ens_bad_shape while [-1,4] is inferred from model custom_add_one"
    ]
    assert report["ens_missing_step"].problems == [
        "ensemble ens_missing_step contains models that are not available or ambiguous: not_a_model"
    ]


def test_a_timeout_reaches_the_steps_and_a_hanging_step_is_restarted(client) -> None:
    mode = partial(tensor, httpclient, "MODE", datatype="BYTES")
    ok = client.infer("ens_hanging", [mode(array=np.array([b"ok"], dtype=np.object_))])
    before = int(ok.as_numpy("OUT")[0])  # the pid of faulty's worker
    with pytest.raises(InferenceServerException) as error:
        hang = mode(array=np.array([b"hang"], dtype=np.object_))
        client.infer("ens_hanging", [hang], timeout=1_000_000)
    assert error.value.status() == "503"
    assert error.value.message() == (
        "in ensemble 'ens_hanging', step 0 (model 'faulty'): Request timeout expired"
    )
    assert worker_pid_once_serving(client) != before  # the hung worker was replaced
    after = client.infer("ens_hanging", [mode(array=np.array([b"ok"], dtype=np.object_))])
    assert int(after.as_numpy("OUT")[0]) != before


# statistics ------------------------------------------------------------------------------------
def test_statistics_of_the_ensemble_and_of_its_steps(client) -> None:
    names = ("ens_diamond", "ens_scale", "custom_add_one", "ens_join")
    before = {name: statistics(client, name) for name in names}
    count = 5
    x = np.ones((2, 4), dtype=np.float32)
    for _ in range(count):
        client.infer("ens_diamond", [tensor(httpclient, "X", x, "FP32")])
    after = {name: statistics(client, name) for name in names}

    def grew(name: str, *path: str) -> int:
        a, b = after[name], before[name]
        for key in path:
            a, b = a[key], b[key]
        return int(a) - int(b)

    ensemble_stats = after["ens_diamond"]
    assert grew("ens_diamond", "inference_stats", "success", "count") == count
    assert grew("ens_diamond", "inference_count") == 2 * count  # a batch of 2 counts 2
    assert grew("ens_diamond", "execution_count") == count
    batch = {b["batch_size"]: b for b in ensemble_stats["batch_stats"]}
    assert batch[2]["compute_infer"]["count"] >= count
    # the ensemble's compute time is its steps' compute time, summed
    steps_infer = sum(grew(n, "inference_stats", "compute_infer", "ns") for n in names[1:])
    assert grew("ens_diamond", "inference_stats", "compute_infer", "ns") == steps_infer
    # each step model counts its own requests: ens_scale is two of the four steps
    assert grew("ens_scale", "inference_stats", "success", "count") == 2 * count
    assert grew("custom_add_one", "inference_stats", "success", "count") == count
    assert grew("ens_join", "inference_stats", "success", "count") == count


def test_a_failure_counts_for_the_ensemble_and_for_the_failing_step(client) -> None:
    before = statistics(client, "ens_diamond")["inference_stats"]["fail"]["count"]
    step_before = statistics(client, "ens_scale")["inference_stats"]["fail"]["count"]
    with pytest.raises(InferenceServerException):
        client.infer("ens_diamond", [tensor(httpclient, "X", -np.ones((1, 4), np.float32), "FP32")])
    assert statistics(client, "ens_diamond")["inference_stats"]["fail"]["count"] == before + 1
    assert statistics(client, "ens_scale")["inference_stats"]["fail"]["count"] == step_before + 1


# streaming -------------------------------------------------------------------------------------
def stream_ensemble(grpc_client, values: list[int], fail_at: int | None = None) -> list:
    answers: queue.Queue = queue.Queue()
    grpc_client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        inputs = [tensor(grpcclient, "IN", np.array(values, dtype=np.int32), "INT32")]
        if fail_at is not None:
            inputs.append(tensor(grpcclient, "FAIL_AT", np.array([fail_at], np.int32), "INT32"))
        grpc_client.async_stream_infer(
            "ens_stream" if fail_at is None else "ens_stream_failing",
            inputs,
            enable_empty_final_response=True,
        )
        received = []
        while True:
            result, error = answers.get(timeout=30)
            received.append((result, error))
            if error is not None:
                break
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                break
        return received
    finally:
        grpc_client.stop_stream()


def test_a_decoupled_step_streams_through_the_ensemble(server: RunningServer) -> None:
    grpc_client = grpcclient.InferenceServerClient(server.grpc_url)
    received = stream_ensemble(grpc_client, [3, 5, 7])
    assert all(error is None for _, error in received)
    answers = [r for r, _ in received if r.as_numpy("TENS") is not None]
    assert [int(r.as_numpy("TENS")[0]) for r in answers] == [30, 50, 70]
    assert [int(r.as_numpy("IDX")[0]) for r in answers] == [0, 1, 2]
    # the last answer is flagged final when nothing else was in flight (as in Triton), else
    # the final flag follows alone
    assert received[: len(answers)] == [(r, None) for r in answers]
    assert len(received) in (3, 4)


def test_a_failing_decoupled_step_ends_the_stream_with_its_error(server: RunningServer) -> None:
    grpc_client = grpcclient.InferenceServerClient(server.grpc_url)
    received = stream_ensemble(grpc_client, [3, 5, 7], fail_at=1)
    (first, no_error), (_, error) = received
    assert no_error is None and int(first.as_numpy("TENS")[0]) == 30
    assert error.message() == (
        "in ensemble 'ens_stream_failing', step 0 (model 'repeat'): failed at 1"
    )


def test_a_decoupled_ensemble_is_refused_a_single_response(client) -> None:
    config = client.get_model_config("ens_stream")
    assert config["model_transaction_policy"]["decoupled"] is True
    with pytest.raises(InferenceServerException) as error:
        client.infer("ens_stream", [tensor(httpclient, "IN", np.array([1], np.int32), "INT32")])
    assert "decoupled" in error.value.message()


def test_an_ensemble_streams_over_http_generate_stream(server: RunningServer) -> None:
    answer = requests.post(
        f"http://{server.url}/v2/models/ens_stream/generate_stream",
        json={"IN": [4, 2]},
        timeout=30,
    )
    assert answer.status_code == 200
    events = [json.loads(line[5:]) for line in answer.text.splitlines() if line.startswith("data:")]
    assert [(e["TENS"], e["IDX"]) for e in events] == [(40, 0), (20, 1)]


# model control ---------------------------------------------------------------------------------
def test_an_ensemble_follows_its_step_model_unloading_and_loading(client) -> None:
    x = np.ones((1, 4), dtype=np.float32)
    infer = partial(client.infer, "ens_chain", [tensor(httpclient, "X", x, "FP32")])
    np.testing.assert_array_equal(infer().as_numpy("Y"), 2 * x)
    client.unload_model("ens_scale_spare")  # as in Triton, its ensemble is checked again
    assert not client.is_model_ready("ens_chain")
    index = {e["name"]: e for e in client.get_model_repository_index()}
    assert index["ens_chain"]["reason"] == (
        "ensemble 'ens_chain' depends on 'ens_scale_spare' which has no loaded version."
    )
    with pytest.raises(InferenceServerException) as error:
        infer()
    assert error.value.status() == "503" and "'ens_scale_spare'" in error.value.message()
    client.load_model("ens_scale_spare")
    assert client.is_model_ready("ens_chain")
    np.testing.assert_array_equal(infer().as_numpy("Y"), 2 * x)


def test_loading_an_ensemble_loads_the_step_models_it_lacks(client) -> None:
    client.unload_model("ens_scale_spare")
    client.unload_model("ens_chain")
    assert not client.is_model_ready("ens_chain")
    client.load_model("ens_chain")  # explicit mode: its step model loads first, as in Triton
    assert client.is_model_ready("ens_scale_spare") and client.is_model_ready("ens_chain")
    x = np.ones((1, 4), dtype=np.float32)
    result = client.infer("ens_chain", [tensor(httpclient, "X", x, "FP32")])
    np.testing.assert_array_equal(result.as_numpy("Y"), 2 * x)
    client.unload_model("ens_chain")
    assert not client.is_model_ready("ens_chain")
    assert client.is_model_ready("ens_scale_spare")  # the step model stays
