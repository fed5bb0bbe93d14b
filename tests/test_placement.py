"""Which models share a worker process and which keep their own (pure rules, no server)."""

from __future__ import annotations

import pytest
from google.protobuf import text_format

from opserve.errors import InvalidArgumentError
from opserve.proto import ModelConfig
from opserve.repository.placement import place


def config(text: str) -> ModelConfig:
    return text_format.Parse('name: "m"\n' + text, ModelConfig())


def parameter(key: str, value: str) -> str:
    return f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}\n'


@pytest.mark.parametrize("backend", ["onnxruntime", "pytorch", "tensorflow"])
def test_framework_models_share_one_worker_per_backend(backend: str) -> None:
    placement = place(config(f'backend: "{backend}"\n'), sharing=True)
    assert placement.shared == backend and placement.reason == ""


def test_nothing_is_shared_unless_the_server_says_so() -> None:
    placement = place(config('backend: "onnxruntime"\n'), sharing=False)
    assert placement.shared is None and "--shared-workers" in placement.reason


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('backend: "python"\n', "backend 'python'"),
        (
            'backend: "onnxruntime"\nmodel_operations { op_library_filename: "libops.so" }\n',
            "model_operations",
        ),
        (
            'backend: "onnxruntime"\nmodel_operations { op_library_filename: "ops.py" }\n',
            "model_operations",
        ),
        ('backend: "pytorch"\n' + parameter("OP_LIBRARY_SOURCES", "ops.cc"), "OP_LIBRARY_SOURCES"),
        (
            'backend: "onnxruntime"\n' + parameter("EXECUTION_ENV_PATH", "/envs/ort"),
            "EXECUTION_ENV_PATH",
        ),
        ('backend: "pytorch"\ninstance_group { kind: KIND_GPU }\n', "GPU"),
        ('backend: "onnxruntime"\n' + parameter("SHARED_WORKER", "false"), "SHARED_WORKER"),
        ('backend: "onnxruntime"\n' + parameter("SHARED_WORKER", " FALSE "), "SHARED_WORKER"),
    ],
)
def test_models_that_could_reach_beyond_their_instances_keep_their_own(
    text: str, reason: str
) -> None:
    placement = place(config(text), sharing=True)
    assert placement.shared is None
    assert reason in placement.reason


def test_op_libraries_from_outside_keep_a_model_apart() -> None:
    placement = place(config('backend: "tensorflow"\n'), sharing=True, outside_libraries=True)
    assert placement.shared is None and "server-wide or preloaded" in placement.reason


def test_a_pytorch_model_on_auto_goes_to_a_gpu_when_there_is_one() -> None:
    auto = config('backend: "pytorch"\ninstance_group { kind: KIND_AUTO }\n')
    assert place(auto, sharing=True).shared == "pytorch"
    assert place(auto, sharing=True, gpus=frozenset({0})).shared is None
    cpu = config('backend: "pytorch"\ninstance_group { kind: KIND_CPU count: 3 }\n')
    assert place(cpu, sharing=True, gpus=frozenset({0})).shared == "pytorch"


def test_the_opt_out_parameter_is_true_or_false() -> None:
    assert place(config('backend: "onnxruntime"\n' + parameter("SHARED_WORKER", "true")), True)
    with pytest.raises(InvalidArgumentError, match='SHARED_WORKER must be "true" or "false"'):
        place(config('backend: "onnxruntime"\n' + parameter("SHARED_WORKER", "no")), True)
    # refused even while sharing is off: a config is either honoured or refused
    with pytest.raises(InvalidArgumentError):
        place(config('backend: "onnxruntime"\n' + parameter("SHARED_WORKER", "0")), False)
