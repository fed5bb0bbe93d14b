"""The table of honoured, refused and ignored config fields (opserve/config/support.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor

from opserve.config.pbtxt import parse_model_config
from opserve.config.support import _BY_PATH, RULES, Verdict, check_fields, render_table
from opserve.config.validate import validate_model
from opserve.errors import InvalidArgumentError
from opserve.proto import ModelConfig

DOCS = Path(__file__).resolve().parents[1] / "docs" / "config-fields.md"


def _paths(descriptor: Descriptor, prefix: str = "") -> list[str]:
    paths = []
    for field in descriptor.fields:
        path = prefix + field.name
        paths.append(path)
        message = field.message_type
        if message is not None and not message.GetOptions().map_entry:
            paths += _paths(message, path + ".")
    return paths


def test_every_field_of_model_config_has_a_rule() -> None:
    """No field can be set without the table saying what happens to it."""
    uncovered = []
    for path in _paths(ModelConfig.DESCRIPTOR):
        if path in _BY_PATH:
            continue
        parts = path.split(".")
        ancestors = [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]
        nearest = next((_BY_PATH[a] for a in ancestors if a in _BY_PATH), None)
        if nearest is None or (nearest.verdict is Verdict.HONOURED and not nearest.whole):
            uncovered.append(path)
    assert uncovered == []


def test_rules_name_real_fields() -> None:
    paths = set(_paths(ModelConfig.DESCRIPTOR))
    assert [r.path for r in RULES if r.path not in paths] == []


def test_the_docs_show_the_table() -> None:
    assert DOCS.read_text() == render_table(), (
        "run: python -m opserve.config.support > docs/config-fields.md"
    )


BASE = 'name: "m" backend: "onnxruntime" max_batch_size: 4 '


@pytest.mark.parametrize(
    "text, field",
    [
        ("sequence_batching { iterative_sequence: true }", "sequence_batching.iterative_sequence"),
        (
            "ensemble_scheduling { step [ { model_name: 'x' model_namespace: 'n' } ] }",
            "ensemble_scheduling.step.model_namespace",
        ),
        ("instance_group [ { kind: KIND_GPU } ]", "instance_group.kind: KIND_GPU"),
        (
            "instance_group [ { count: 1 rate_limiter { priority: 2 } } ]",
            "instance_group.rate_limiter",
        ),
        ("model_repository_agents { agents [ { name: 'checksum' } ] }", "model_repository_agents"),
        (
            "input [ { name: 'I' data_type: TYPE_FP32 dims: [1] allow_ragged_batch: true } ]",
            "input.allow_ragged_batch",
        ),
        ("batch_input [ { kind: BATCH_ELEMENT_COUNT target_name: 'N' } ]", "batch_input"),
        ("runtime: 'libtriton_onnxruntime.so'", "runtime"),
        (
            "optimization { execution_accelerators { cpu_execution_accelerator [ { name: 'openvino' } ] } }",
            "optimization.execution_accelerators",
        ),
    ],
)
def test_refused_fields_are_errors_naming_the_field(text: str, field: str) -> None:
    findings = check_fields(parse_model_config(BASE + text), gpu=False)
    assert len(findings.errors) == 1
    assert f"config field '{field}' of model 'm' is not supported" in findings.errors[0]


@pytest.mark.parametrize(
    "text, field",
    [
        (
            "optimization { input_pinned_memory { enable: true } }",
            "optimization.input_pinned_memory",
        ),
        ("metric_tags { key: 'team' value: 'a' }", "metric_tags"),
        (
            "parameters { key: 'enable_mem_arena' value: { string_value: '1' } }",
            "parameters { enable_mem_arena }",
        ),
        ("dynamic_batching { preserve_ordering: true }", "dynamic_batching.preserve_ordering"),
    ],
)
def test_ignored_fields_are_warnings_naming_the_field(text: str, field: str) -> None:
    findings = check_fields(parse_model_config(BASE + text), gpu=False)
    assert findings.errors == []
    assert len(findings.warnings) == 1
    assert f"config field '{field}' of model 'm' is ignored" in findings.warnings[0]


@pytest.mark.parametrize(
    "text",
    [
        "input [ { name: 'I' data_type: TYPE_FP32 dims: [-1] reshape { shape: [] } optional: true } ]",
        "dynamic_batching { preferred_batch_size: [2] max_queue_delay_microseconds: 100 }",
        "instance_group [ { name: 'g' kind: KIND_CPU count: 2 } ]",
        "parameters { key: 'intra_op_thread_count' value: { string_value: '1' } }",
        "parameters { key: 'EXECUTION_ENV_PATH' value: { string_value: 'env' } }",
        "optimization { graph { level: 1 } }",
        "version_policy { specific { versions: [1, 3] } }",
        "model_operations { op_library_filename: ['libmy.so'] }",
        "output [ { name: 'O' data_type: TYPE_FP32 dims: [1] label_filename: 'l.txt' } ]",
    ],
)
def test_honoured_fields_pass_silently(text: str) -> None:
    findings = check_fields(parse_model_config(BASE + text), gpu=False)
    assert (findings.errors, findings.warnings) == ([], [])


def test_decoupled_models_cannot_cache_responses() -> None:
    """Triton's rule (core's ValidateModelConfig), in its words."""
    text = 'name: "m" backend: "python" model_transaction_policy { decoupled: true } response_cache { enable: true }'
    with pytest.raises(InvalidArgumentError, match="Response Cache does not currently support"):
        validate_model(parse_model_config(text))


def test_python_models_read_every_parameter() -> None:
    config = parse_model_config(
        'name: "m" backend: "python" parameters { key: "x" value: { string_value: "1" } }'
    )
    assert check_fields(config, gpu=False).warnings == []


def test_gpu_kind_is_honoured_by_pytorch_where_a_gpu_is_present() -> None:
    text = 'name: "m" backend: "pytorch" instance_group [ { kind: KIND_GPU gpus: [0] } ]'
    assert check_fields(parse_model_config(text), gpu=True).errors == []
    assert len(check_fields(parse_model_config(text), gpu=False).errors) == 2
