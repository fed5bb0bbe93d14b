"""Triton's rules for a model config, checked before the model file is looked at.

Each file in tests/data/l0_model_config is one of the invalid configurations of Triton 2.51's
QA suite `qa/L0_model_config` (triton-inference-server/server): the `noautofill_platform`
cases (Triton's test appends each platform in turn; here: onnxruntime_onnx) and the
`autofill_noplatform/onnx` cases, which need the model (described here by its signature: the
test's ONNX model takes INPUT0 and INPUT1, INT32 [-1,16], and gives OUTPUT0 and OUTPUT1,
INT8 [-1,16]; `nobatch`: [16]). Its first line is the message Triton's test greps the
server's log for (its `expected` file); `# gpus:` names the GPUs of the machine the case
needs (Triton's expectation is for a machine with GPU 0; those cases use pytorch_libtorch,
the backend this server runs on GPUs: for the others KIND_AUTO resolves to the CPU). The
rules are read from core's `src/model_config_utils.cc` and the onnxruntime backend's
`src/onnxruntime.cc`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from opserve.config import config_to_json, model_config_for, parse_model_config
from opserve.config.autocomplete import autocomplete
from opserve.config.normalize import normalize_instance_groups
from opserve.config.validate import (
    check_against_signature,
    check_before_load,
    validate_config,
)
from opserve.errors import OpserveError
from opserve.proto import ModelConfig, model_config_pb2
from opserve.signature import ModelSignature, TensorSpec
from tests import models
from tests.serving import RunningServer

CASES = Path(__file__).parent / "data" / "l0_model_config"
KIND_CPU = model_config_pb2.ModelInstanceGroup.KIND_CPU


def read_case(path: Path) -> tuple[str, dict[str, str], str]:
    """The config's text, its header fields (`# key: value`) and the expected message."""
    text = path.read_text()
    headers = {}
    for line in text.splitlines():
        if not line.startswith("# "):
            break
        key, _, value = line[2:].partition(": ")
        headers[key] = value
    return text, headers, headers.pop("expected")


def described_model(batching: bool) -> ModelSignature:
    shape = (-1, 16) if batching else (16,)
    return ModelSignature(
        (TensorSpec("INPUT0", "INT32", shape), TensorSpec("INPUT1", "INT32", shape)),
        (TensorSpec("OUTPUT0", "INT8", shape), TensorSpec("OUTPUT1", "INT8", shape)),
    )


@pytest.mark.parametrize("path", sorted(CASES.glob("*.pbtxt")), ids=lambda p: p.stem)
def test_triton_refuses_it_with_its_words(path: Path, tmp_path: Path) -> None:
    text, headers, expected = read_case(path)
    gpus = frozenset(int(g) for g in headers.get("gpus", "").split(",") if g)
    with pytest.raises(OpserveError) as raised:
        if "model" in headers:  # Triton's autofill runs; the model decides
            config = parse_model_config(text)
            signature = described_model(headers["model"] == "batching")
            check_before_load(config, auto_complete=True, gpus=gpus)
            ran = not config.input or not config.output
            autocomplete(config, signature)
            check_against_signature(config, signature, autocompleted=ran)
        else:  # as the server reads it (platform and name included), auto-complete off
            folder = tmp_path / path.stem
            folder.mkdir()
            (folder / "config.pbtxt").write_text(text)
            config = model_config_for(path.stem, folder, auto_complete=False)
            check_before_load(config, auto_complete=False, gpus=gpus)
    assert expected in raised.value.message


VALID = {
    "reshape between variable stretches": "input { name: 'I' data_type: TYPE_FP32 "
    "dims: [2, 4, -1, 6] reshape { shape: [8, -1, 1, 6] } }",
    "empty reshape of a batched [1]": "max_batch_size: 4 input { name: 'I' "
    "data_type: TYPE_FP32 dims: [1] reshape { shape: [] } }",
    "preferred sizes within max_batch_size": "max_batch_size: 8 input { name: 'I' "
    "data_type: TYPE_FP32 dims: [-1] } dynamic_batching { preferred_batch_size: [2, 8] }",
    "priorities": "max_batch_size: 8 input { name: 'I' data_type: TYPE_FP32 dims: [-1] } "
    "dynamic_batching { priority_levels: 2 default_priority_level: 2 "
    "priority_queue_policy { key: 1 value { max_queue_size: 3 } } }",
    "a CPU group": "input { name: 'I' data_type: TYPE_FP32 dims: [-1] } "
    "instance_group [ { kind: KIND_CPU count: 3 } ]",
    "batch input and output": "max_batch_size: 4 input { name: 'I' data_type: TYPE_FP32 "
    "dims: [-1] } output { name: 'O' data_type: TYPE_FP32 dims: [-1] } batch_input { "
    "kind: BATCH_ELEMENT_COUNT target_name: 'N' data_type: TYPE_INT32 source_input: 'I' } "
    "batch_output { kind: BATCH_SCATTER_WITH_INPUT_SHAPE target_name: 'O' source_input: 'I' }",
}


@pytest.mark.parametrize("text", VALID.values(), ids=list(VALID))
def test_valid_configs_pass(text: str) -> None:
    config = parse_model_config(f'name: "m" backend: "onnxruntime" {text}')
    check_before_load(config, auto_complete=False)
    validate_config(config)


def test_tensors_auto_complete_may_fill_are_checked_only_once_it_has() -> None:
    text = "max_batch_size: 4 input { name: 'INPUT0' dims: [16] } input { name: 'INPUT1' }"
    config = parse_model_config(f'name: "m" backend: "onnxruntime" {text}')
    check_before_load(config, auto_complete=True)  # data types and dims may come from the model
    with pytest.raises(OpserveError, match="model input 'INPUT0' must specify 'data_type' for m"):
        check_before_load(parse_model_config(f'name: "m" backend: "onnxruntime" {text}'), False)
    autocomplete(config, described_model(batching=True))
    check_against_signature(config, described_model(batching=True), autocompleted=True)
    validate_config(config)


def test_a_tensor_named_twice_is_refused() -> None:
    config = ModelConfig(name="m", backend="python")
    for _ in range(2):
        config.input.add(name="X", data_type=1, dims=[1])
    with pytest.raises(OpserveError, match="model input 'X' is specified more than once"):
        validate_config(config)


# --- a real server: what a client sees ---------------------------------------------------------

# Triton 2.51's answer for `qa/L0_model_config/autofill_noplatform_success/onnx/no_config`
# (its `expected`, a GPU machine's) on a machine without GPUs: one group named after the model,
# KIND_CPU with the onnxruntime backend's two instances (core's NormalizeInstanceGroup and
# SetDefaultInstanceCount); the dynamic batcher the backend's AutoCompleteMaxBatch turns on, with
# max_batch_size as its preferred size, and pinned memory on (core's NormalizeModelConfig).
TRITON_NO_CONFIG = """
name: "no_config"
platform: "onnxruntime_onnx"
version_policy { latest { num_versions: 1 } }
max_batch_size: 4
input { name: "INPUT0" data_type: TYPE_INT32 dims: 16 }
input { name: "INPUT1" data_type: TYPE_INT32 dims: 16 }
output { name: "OUTPUT0" data_type: TYPE_INT32 dims: 16 }
output { name: "OUTPUT1" data_type: TYPE_INT32 dims: 16 }
instance_group { name: "no_config" count: 2 kind: KIND_CPU }
dynamic_batching { preferred_batch_size: 4 }
default_model_filename: "model.onnx"
optimization { input_pinned_memory { enable: true } output_pinned_memory { enable: true } }
backend: "onnxruntime"
runtime: ""
"""


@pytest.fixture(scope="module")
def triton_cases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("l0_model_config")
    # refused before the model is looked at (Triton's noautofill_platform/zerodims_input0)
    zero = (CASES / "zerodims_input0.pbtxt").read_text().replace("zerodims_input0", "zero_dims")
    models.write_model(repo, "zero_dims", models.add_sub(), zero)
    # refused once the model is described (autofill_noplatform/onnx/bad_input_dims)
    bad = (CASES / "onnx_bad_input_dims.pbtxt").read_text().replace("bad_input_dims", "bad_dims")
    models.write_model(repo, "bad_dims", models.add_sub(), bad)
    models.write_model(repo, "no_config", models.add_sub())
    with RunningServer([repo]) as server:
        yield server


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (
            "zero_dims",
            "model input 'input' dimension must be integer >= 1, or -1 to indicate a "
            "variable-size dimension for zero_dims",
        ),
        (
            "bad_dims",
            "model 'bad_dims', tensor 'INPUT0': the model expects 2 dimensions (shape [-1,16]) "
            "but the model configuration specifies 3 dimensions",
        ),
    ],
)
def test_an_invalid_config_makes_the_model_unavailable_with_tritons_words(
    triton_cases: RunningServer, model: str, reason: str
) -> None:
    client = httpclient.InferenceServerClient(triton_cases.url)
    assert not client.is_model_ready(model)
    index = {m["name"]: m for m in client.get_model_repository_index()}
    assert index[model]["state"] == "UNAVAILABLE"
    assert reason in index[model]["reason"]
    assert reason in triton_cases.log()


def test_auto_complete_matches_tritons_config_field_by_field(triton_cases: RunningServer) -> None:
    """As Triton's compare_status.py compares: the gRPC config proto, and the HTTP JSON."""
    expected = parse_model_config(TRITON_NO_CONFIG)
    grpc = grpcclient.InferenceServerClient(triton_cases.grpc_url)
    assert grpc.get_model_config("no_config").config == expected
    http = httpclient.InferenceServerClient(triton_cases.url)
    assert http.get_model_config("no_config") == config_to_json(expected)
    inputs = []
    for name in ("INPUT0", "INPUT1"):
        tensor = httpclient.InferInput(name, [1, 16], "INT32")
        tensor.set_data_from_numpy(np.ones((1, 16), dtype=np.int32))
        inputs.append(tensor)
    assert http.infer("no_config", inputs).as_numpy("OUTPUT0").tolist() == [[2] * 16]


def test_instance_groups_are_named_counted_and_placed_as_triton_does() -> None:
    """Core's NormalizeInstanceGroup: autofill_noplatform_success/onnx/no_config_no_batch
    (`instance_group [ { kind: KIND_CPU } ]` -> `<model>_0`, two CPU instances) and its
    cpu_instance case (a named group keeps its name); KIND_AUTO resolves to the CPU without GPUs;
    count 1 for other backends."""
    config = parse_model_config(
        'name: "m" backend: "onnxruntime" instance_group [ { kind: KIND_CPU }, '
        '{ name: "mine" kind: KIND_CPU }, { count: 3 } ]'
    )
    normalize_instance_groups(config, frozenset())
    groups = [(g.name, g.count, g.kind) for g in config.instance_group]
    assert groups == [("m_0", 2, KIND_CPU), ("mine", 2, KIND_CPU), ("m_2", 3, KIND_CPU)]
    python = parse_model_config('name: "p" backend: "python"')
    check_before_load(python, gpus=frozenset({0}))  # only pytorch runs on a GPU here
    assert [(g.name, g.count, g.kind) for g in python.instance_group] == [("p", 1, KIND_CPU)]
