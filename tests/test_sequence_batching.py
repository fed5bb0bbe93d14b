"""The sequence batcher's pure parts, without a server: config checks, control and state
tensors, batch planning for both strategies, null requests, the request parameters."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from opserve.check import check_repository
from opserve.dataplane import take_sequence_parameters
from opserve.errors import InvalidArgumentError, UnsupportedError
from opserve.inference import InferenceRequest, Tensor
from opserve.proto import ModelConfig
from opserve.sequence_config import (
    FLAG_SEQUENCE_END,
    FLAG_SEQUENCE_START,
    SequenceSettings,
    sequence_input_names,
    sequence_output_names,
)
from opserve.sequences import Head, null_inputs, plan_direct, plan_oldest

CONTROLS = """
  control_input [
    { name: "S" control [ { kind: CONTROL_SEQUENCE_START fp32_false_true: [ 0, 1 ] } ] },
    { name: "E" control [ { kind: CONTROL_SEQUENCE_END int32_false_true: [ 5, 9 ] } ] },
    { name: "R" control [ { kind: CONTROL_SEQUENCE_READY bool_false_true: [ false, true ] } ] },
    { name: "C" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: %s } ] }
  ]
"""


def config(text: str, max_batch_size: int = 4) -> ModelConfig:
    made = ModelConfig(name="m", max_batch_size=max_batch_size)
    text_format.Parse(f"sequence_batching {{ {text} }}", made)
    return made


def settings(text: str, max_batch_size: int = 4, folder: Path | None = None) -> SequenceSettings:
    return SequenceSettings.from_config(config(text, max_batch_size), folder)


def values(tensor: Tensor) -> list:
    return tensor.to_numpy().reshape(-1).tolist()


def test_defaults_follow_triton() -> None:
    made = settings("", max_batch_size=8)
    assert (made.strategy, made.slots, made.idle_ns, made.delay_ns) == ("direct", 8, 10**9, 0)
    assert settings("", max_batch_size=0).slots == 1
    oldest = settings("oldest { max_candidate_sequences: 3 }", max_batch_size=8)
    assert (oldest.strategy, oldest.slots, oldest.target) == ("oldest", 3, 8)
    assert settings("oldest { preferred_batch_size: [ 2, 4 ] }", 8).target == 4


def test_control_tensors_hold_the_configured_false_and_true_values() -> None:
    made = settings(CONTROLS % "TYPE_UINT64")
    start, end, ready, corrid = made.control_tensors(True, False, True, 2**63 + 5)
    assert [t.name for t in (start, end, ready, corrid)] == ["S", "E", "R", "C"]
    assert (start.datatype, start.shape, values(start)) == ("FP32", (1, 1), [1.0])
    assert (end.datatype, values(end)) == ("INT32", [5])
    assert (ready.datatype, values(ready)) == ("BOOL", [True])
    assert (corrid.datatype, values(corrid)) == ("UINT64", [2**63 + 5])
    null = made.control_tensors(False, True, False, 0)
    assert [values(t) for t in null] == [[0.0], [9], [False], [0]]


def test_without_batching_controls_have_shape_one_and_string_ids_are_bytes() -> None:
    made = settings(CONTROLS % "TYPE_STRING", max_batch_size=0)
    corrid = made.control_tensors(True, True, True, "seq-a")[-1]
    assert (corrid.datatype, corrid.shape, values(corrid)) == ("BYTES", (1,), [b"seq-a"])


def test_state_starts_from_zeros_or_from_its_data_file(tmp_path: Path) -> None:
    zero = settings(
        'state [ { input_name: "I" output_name: "O" data_type: TYPE_INT32 dims: [ -1, 2 ] } ]'
    )
    (state,) = zero.states
    assert (state.initial.shape, values(state.initial)) == ((1, 1, 2), [0, 0])
    (tmp_path / "initial_state").mkdir()
    (tmp_path / "initial_state" / "s.bin").write_bytes(struct.pack("<2f", 1.5, 2.5))
    from_file = settings(
        'state [ { input_name: "I" output_name: "O" data_type: TYPE_FP32 dims: [ 2 ] '
        'initial_state { name: "s" data_type: TYPE_FP32 dims: [ 2 ] data_file: "s.bin" } } ]',
        folder=tmp_path,
    )
    assert values(from_file.states[0].initial) == [1.5, 2.5]
    made = config('state [ { input_name: "I" output_name: "O" data_type: TYPE_FP32 } ]')
    made.sequence_batching.control_input.add(name="C")
    assert sequence_input_names(made) == ["C", "I"] and sequence_output_names(made) == ["O"]


@pytest.mark.parametrize(
    "text, max_batch_size, message",
    [
        (
            'control_input [ { name: "A" control [ { kind: CONTROL_SEQUENCE_START } ] } ]',
            4,
            "sequence batching must specify either 'int32_false_true', 'fp32_false_true' or "
            "'bool_false_true' for CONTROL_SEQUENCE_START for m",
        ),
        (
            'control_input [ { name: "A" control [ { kind: CONTROL_SEQUENCE_END '
            "int32_false_true: [ 0, 1 ] fp32_false_true: [ 0, 1 ] } ] } ]",
            4,
            "specifies more than one from",
        ),
        (
            'control_input [ { name: "A" control [ { kind: CONTROL_SEQUENCE_READY '
            "int32_false_true: [ 1 ] } ] } ]",
            4,
            "sequence batching control 'int32_false_true' must have exactly 2 entries for "
            "CONTROL_SEQUENCE_READY for m",
        ),
        (
            'control_input [ { name: "A" control [ { kind: CONTROL_SEQUENCE_CORRID '
            "data_type: TYPE_FP32 } ] } ]",
            4,
            "unexpected data type for control CONTROL_SEQUENCE_CORRID for m",
        ),
        (
            'control_input [ { name: "A" control [ { kind: CONTROL_SEQUENCE_START '
            'int32_false_true: [ 0, 1 ] } ] }, { name: "B" control [ { kind: '
            "CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] } ]",
            4,
            "sequence batching specifies multiple CONTROL_SEQUENCE_START tensors for m",
        ),
        (
            "oldest { preferred_batch_size: [ 8 ] }",
            4,
            "sequence batching preferred batch size must be <= max batch size for m",
        ),
        (
            "direct { minimum_slot_utilization: 1.5 }",
            4,
            "sequence batching minimum slot utilization must be in range (0.0, 1.0] for m",
        ),
        (
            'state [ { input_name: "I" output_name: "O" data_type: TYPE_FP32 dims: [ 2 ] '
            'initial_state { name: "s" data_type: TYPE_INT32 dims: [ 2 ] zero_data: true } } ]',
            4,
            "The data type used for 'initial_state' field of state 'I' does not match",
        ),
        (
            'state [ { input_name: "I" output_name: "O" data_type: TYPE_FP32 dims: [ 2 ] '
            'initial_state { name: "s" data_type: TYPE_FP32 dims: [ 3 ] zero_data: true } } ]',
            4,
            "'initial_state' dim for input name 'I' doesn't match 'state' dim description. 3 != 2",
        ),
    ],
)
def test_configs_triton_refuses_are_refused_with_its_words(
    text: str, max_batch_size: int, message: str
) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        settings(text, max_batch_size)
    assert message in caught.value.message


@pytest.mark.parametrize("text", ["iterative_sequence: true", "oldest { preserve_ordering: true }"])
def test_fields_not_implemented_are_refused(text: str) -> None:
    with pytest.raises(UnsupportedError, match="is not supported by this server"):
        settings(text)


def test_state_of_a_decoupled_model_is_refused() -> None:
    made = config('state [ { input_name: "I" output_name: "O" data_type: TYPE_FP32 } ]')
    made.model_transaction_policy.decoupled = True
    with pytest.raises(InvalidArgumentError, match="decoupled"):
        SequenceSettings.from_config(made)


def test_direct_batches_are_in_slot_order_with_nulls_in_the_gaps() -> None:
    heads = [Head(2, 20, ("a",)), Head(0, 10, ("a",)), Head(3, 5, ("b",))]
    # the oldest request decides the shape: slot 3 runs alone, padded below
    assert plan_direct(heads, 4, 0.0, 0, 100) == ([None, None, None, 3], None)
    heads = heads[:2]
    assert plan_direct(heads, 4, 0.0, 0, 100) == ([0, None, 2], None)
    assert plan_direct([], 4, 0.0, 0, 100) == (None, None)


def test_direct_waits_for_slot_utilization_up_to_the_delay() -> None:
    heads = [Head(1, 10, ())]
    assert plan_direct(heads, 4, 0.5, 50, 20) == (None, 60)
    assert plan_direct(heads, 4, 0.5, 50, 60) == ([None, 1], None)
    two = [Head(1, 10, ()), Head(3, 12, ())]
    assert plan_direct(two, 4, 0.5, 50, 20) == ([None, 1, None, 3], None)


def test_oldest_takes_the_oldest_requests_of_one_shape_up_to_the_target() -> None:
    heads = [Head(0, 30, ()), Head(1, 10, ()), Head(2, 20, ()), Head(3, 15, ("x",))]
    assert plan_oldest(heads, 2, 0, 100) == ([1, 2], None)
    assert plan_oldest(heads, 8, 0, 100) == ([1, 2, 0], None)
    # fewer than the target: wait until the oldest has waited the delay
    assert plan_oldest(heads, 8, 50, 40) == (None, 60)
    assert plan_oldest(heads, 8, 50, 60) == ([1, 2, 0], None)


def test_null_inputs_keep_shapes_and_hold_zeros() -> None:
    real = [
        Tensor.from_numpy("X", np.array([[3.5, 1.0]], dtype=np.float32)),
        Tensor.from_numpy("S", np.array([[b"text"]], dtype=np.object_), "BYTES"),
    ]
    x, s = null_inputs(real)
    assert (x.shape, values(x)) == ((1, 2), [0.0, 0.0])
    assert (s.datatype, s.shape, values(s)) == ("BYTES", (1, 1), [b""])


def request(parameters: dict) -> InferenceRequest:
    return InferenceRequest("m", "", [], parameters=parameters)


def test_sequence_parameters_become_the_correlation_id_and_flags() -> None:
    made = request({"sequence_id": 7, "sequence_start": True, "sequence_end": False, "x": 1})
    take_sequence_parameters(made)
    assert (made.correlation_id, made.flags, made.parameters) == (7, FLAG_SEQUENCE_START, {"x": 1})
    made = request({"sequence_id": "abc", "sequence_end": True})
    take_sequence_parameters(made)
    assert (made.correlation_id, made.flags) == ("abc", FLAG_SEQUENCE_END)
    made = request({"sequence_id": -1})  # a gRPC int64 holding a uint64, as Triton reads it
    take_sequence_parameters(made)
    assert made.correlation_id == 2**64 - 1


@pytest.mark.parametrize(
    "parameters, name",
    [
        ({"sequence_id": 1.5}, "sequence_id"),
        ({"sequence_id": True}, "sequence_id"),
        ({"sequence_start": 1}, "sequence_start"),
        ({"sequence_end": "yes"}, "sequence_end"),
    ],
)
def test_sequence_parameters_of_the_wrong_type_are_refused(parameters: dict, name: str) -> None:
    with pytest.raises(InvalidArgumentError, match=f"Unable to parse '{name}'"):
        take_sequence_parameters(request(parameters))


def test_opserve_check_reports_a_sequence_config_triton_refuses(tmp_path: Path) -> None:
    folder = tmp_path / "repository" / "seq"
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(
        'backend: "python"\nmax_batch_size: 2\n'
        "sequence_batching { oldest { preferred_batch_size: [ 4 ] } }\n"
    )
    (report,) = check_repository([tmp_path / "repository"]).models
    assert "sequence batching preferred batch size must be <= max batch size for seq" in (
        report.problems
    )
