"""A model's `sequence_batching`, checked as Triton checks it, and the tensors the sequence
batcher adds to each request: the control inputs (START, END, READY, CORRID) and the implicit
state (`state`). Pure: no scheduling here (that is `sequences.py`).

Every field is honoured except `iterative_sequence` and `oldest.preserve_ordering`, which are
refused; a state's `use_same_buffer_for_input_output` and `use_growable_memory` (GPU memory
choices) change nothing a client can see and are accepted as they are.

The model receives a control tensor of shape `[1]` (batched: `[1, 1]` per request), holding the
config's false or true value; the state input holds what the model produced as the state output
for the sequence's previous request (the initial state for its first one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from opserve.datatypes import ITEM_SIZES, NUMPY_DTYPES, config_to_v2, element_count, serialize_bytes
from opserve.errors import InvalidArgumentError, UnsupportedError
from opserve.inference import Tensor
from opserve.proto import ModelConfig, model_config_pb2

SEQUENCE_IDLE_DEFAULT_MICROSECONDS = 1_000_000
INITIAL_STATE_FOLDER = "initial_state"  # in the model folder, as Triton's `data_file`
BOOLEAN_KINDS = ("CONTROL_SEQUENCE_START", "CONTROL_SEQUENCE_END", "CONTROL_SEQUENCE_READY")
CORRID_KIND = "CONTROL_SEQUENCE_CORRID"
CORRID_TYPES = ("UINT64", "INT64", "UINT32", "INT32", "BYTES")
# the request flags of Triton's API (TRITONSERVER_REQUEST_FLAG_SEQUENCE_*)
FLAG_SEQUENCE_START = 1
FLAG_SEQUENCE_END = 2


@dataclass(frozen=True, slots=True)
class Control:
    """One control input: its name, kind, V2 datatype and (boolean kinds) false/true values."""

    name: str
    kind: str
    datatype: str
    values: tuple[float | int | bool, float | int | bool] = (0, 1)

    def tensor(self, value: bool | int | str, batched: bool) -> Tensor:
        shape = (1, 1) if batched else (1,)
        element: float | int | bool | str
        if self.kind == CORRID_KIND:
            if self.datatype == "BYTES":
                data = serialize_bytes([str(value).encode()])
                return Tensor(self.name, "BYTES", shape, data)
            element = value
        else:
            element = self.values[1] if value else self.values[0]
        array = np.array([element], dtype=NUMPY_DTYPES[self.datatype])
        return Tensor(self.name, self.datatype, shape, array.tobytes())


@dataclass(frozen=True, slots=True)
class State:
    """One implicit state: read by the model as `input_name`, produced as `output_name`."""

    input_name: str
    output_name: str
    datatype: str
    initial: Tensor  # what the first request of a sequence reads (batched: shape [1, ...])


@dataclass(frozen=True, slots=True)
class SequenceSettings:
    model: str
    strategy: str  # "direct" or "oldest"
    max_batch_size: int
    slots: int  # sequences an instance holds at once
    idle_ns: int
    delay_ns: int
    minimum_slot_utilization: float  # direct
    preferred: tuple[int, ...]  # oldest
    controls: tuple[Control, ...]
    states: tuple[State, ...]

    @property
    def batched(self) -> bool:
        return self.max_batch_size > 0

    @property
    def corrid(self) -> Control | None:
        return next((c for c in self.controls if c.kind == CORRID_KIND), None)

    @property
    def target(self) -> int:
        """The batch size the oldest strategy waits for."""
        return max(self.preferred) if self.preferred else max(self.max_batch_size, 1)

    def control_tensors(
        self, start: bool, end: bool, ready: bool, correlation_id: int | str
    ) -> list[Tensor]:
        values = {
            "CONTROL_SEQUENCE_START": start,
            "CONTROL_SEQUENCE_END": end,
            "CONTROL_SEQUENCE_READY": ready,
            CORRID_KIND: correlation_id,
        }
        return [c.tensor(values[c.kind], self.batched) for c in self.controls]

    @classmethod
    def from_config(cls, config: ModelConfig, model_dir: Path | None = None) -> SequenceSettings:
        """The settings, or Triton's INVALID_ARG for a config it would refuse."""
        batcher = config.sequence_batching
        name = config.name
        if config.response_cache.enable:
            raise InvalidArgumentError(
                f"Response Cache does not currently support model {name} with sequence "
                "batching scheduler. Please disable the response cache."
            )
        controls = _controls(batcher, name)
        for refused, given in (
            ("iterative_sequence", batcher.iterative_sequence),
            ("oldest.preserve_ordering", batcher.oldest.preserve_ordering),
        ):
            if given:
                raise UnsupportedError(
                    f"model '{name}': sequence_batching.{refused} is not supported by this server"
                )
        strategy = "oldest" if batcher.HasField("oldest") else "direct"
        slots = max(1, config.max_batch_size)
        preferred: tuple[int, ...] = ()
        if strategy == "oldest":
            oldest = batcher.oldest
            for size in oldest.preferred_batch_size:
                if size <= 0:
                    raise InvalidArgumentError(
                        f"sequence batching preferred batch size must be positive for {name}"
                    )
                if size > config.max_batch_size:
                    raise InvalidArgumentError(
                        "sequence batching preferred batch size must be <= max batch size "
                        f"for {name}"
                    )
            preferred = tuple(oldest.preferred_batch_size)
            if oldest.max_candidate_sequences > 0:
                slots = oldest.max_candidate_sequences
            delay_us = oldest.max_queue_delay_microseconds
            utilization = 0.0
        else:
            utilization = batcher.direct.minimum_slot_utilization
            if not 0.0 <= utilization <= 1.0:
                raise InvalidArgumentError(
                    "sequence batching minimum slot utilization must be in range (0.0, 1.0] "
                    f"for {name}"
                )
            delay_us = batcher.direct.max_queue_delay_microseconds
        idle_us = batcher.max_sequence_idle_microseconds or SEQUENCE_IDLE_DEFAULT_MICROSECONDS
        states = _states(batcher, config.max_batch_size > 0, model_dir)
        if states and config.model_transaction_policy.decoupled:
            raise InvalidArgumentError(
                f"model '{name}': implicit state (sequence_batching.state) is not supported for "
                "decoupled models by this server"
            )
        return cls(
            name,
            strategy,
            config.max_batch_size,
            slots,
            idle_us * 1000,
            delay_us * 1000,
            utilization,
            preferred,
            controls,
            states,
        )


def fill_sequence_defaults(config: ModelConfig) -> None:
    """Triton's defaults written into the config (so `/config` shows them): the idle time, and
    the oldest strategy's preferred batch size."""
    batcher = config.sequence_batching
    if not batcher.max_sequence_idle_microseconds:
        batcher.max_sequence_idle_microseconds = SEQUENCE_IDLE_DEFAULT_MICROSECONDS
    oldest = batcher.oldest
    if batcher.HasField("oldest") and not oldest.preferred_batch_size and config.max_batch_size:
        oldest.preferred_batch_size.append(config.max_batch_size)


def sequence_input_names(config: ModelConfig) -> list[str]:
    """The inputs the sequence batcher adds (controls, then states): not in `config.input`."""
    batcher = config.sequence_batching
    return [c.name for c in batcher.control_input] + [s.input_name for s in batcher.state]


def sequence_output_names(config: ModelConfig) -> list[str]:
    """The state outputs: produced by the model, kept by the batcher, never sent to a client."""
    return [s.output_name for s in config.sequence_batching.state]


def _v2(data_type: int) -> str:
    return config_to_v2(model_config_pb2.DataType.Name(data_type))


def _controls(batcher, name: str) -> tuple[Control, ...]:
    seen_tensors: set[str] = set()
    seen_kinds: set[str] = set()
    controls: list[Control] = []
    for control_input in batcher.control_input:
        if not control_input.name:
            raise InvalidArgumentError(
                f"sequence batching control tensor must have a name for {name}"
            )
        if control_input.name in seen_tensors:
            raise InvalidArgumentError(
                f"sequence batching control tensor '{control_input.name}' is specified for "
                f"multiple control kinds for {name}"
            )
        seen_tensors.add(control_input.name)
        for control in control_input.control:
            kind = model_config_pb2.ModelSequenceBatching.Control.Kind.Name(control.kind)
            if kind in seen_kinds:
                raise InvalidArgumentError(
                    f"sequence batching specifies multiple {kind} tensors for {name}"
                )
            seen_kinds.add(kind)
            if kind == CORRID_KIND:
                datatype = _v2(control.data_type)
                if datatype not in CORRID_TYPES:
                    raise InvalidArgumentError(
                        f"unexpected data type for control {kind} for {name}. Allowed data "
                        "types are TYPE_UINT64, TYPE_INT64, TYPE_UINT32, TYPE_INT32 and "
                        "TYPE_STRING"
                    )
                controls.append(Control(control_input.name, kind, datatype))
            else:
                controls.append(_boolean_control(control_input.name, kind, control, name))
    return tuple(controls)


def _boolean_control(tensor: str, kind: str, control, name: str) -> Control:
    given = [
        (field, datatype, list(getattr(control, field)))
        for field, datatype in (
            ("int32_false_true", "INT32"),
            ("fp32_false_true", "FP32"),
            ("bool_false_true", "BOOL"),
        )
        if len(getattr(control, field))
    ]
    if not given:
        raise InvalidArgumentError(
            "sequence batching must specify either 'int32_false_true', 'fp32_false_true' or "
            f"'bool_false_true' for {kind} for {name}"
        )
    if len(given) > 1:
        raise InvalidArgumentError(
            "sequence batching specifies more than one from 'int32_false_true', "
            f"'fp32_false_true' and 'bool_false_true' for {kind} for {name}"
        )
    field, datatype, values = given[0]
    if len(values) != 2:
        raise InvalidArgumentError(
            f"sequence batching control '{field}' must have exactly 2 entries for {kind} for {name}"
        )
    return Control(tensor, kind, datatype, (values[0], values[1]))


def _states(batcher, batched: bool, model_dir: Path | None) -> tuple[State, ...]:
    states: list[State] = []
    seen: set[str] = set()
    for state in batcher.state:
        if state.input_name in seen:
            raise InvalidArgumentError(
                f"State input name '{state.input_name}' specified more than once."
            )
        seen.add(state.input_name)
        if not state.input_name or not state.output_name:
            raise InvalidArgumentError(
                "sequence batching state must name its input_name and output_name"
            )
        datatype = _v2(state.data_type)
        if len(state.initial_state) > 1:
            raise InvalidArgumentError(
                f"initial_state field for state input '{state.input_name}' must contain "
                f"exactly one or zero element. Found '{len(state.initial_state)}' elements."
            )
        # variable dimensions start as 1 for the first request, as in Triton
        dims = tuple(1 if d == -1 else d for d in state.dims)
        data: bytes | None = None
        if state.initial_state:
            dims, data = _initial_state(state, datatype, model_dir)
        shape = ((1,) if batched else ()) + dims
        if data is None:
            data = _zeros(datatype, shape)
        states.append(
            State(
                state.input_name,
                state.output_name,
                datatype,
                Tensor(state.input_name, datatype, shape, data),
            )
        )
    return tuple(states)


def _initial_state(
    state, datatype: str, model_dir: Path | None
) -> tuple[tuple[int, ...], bytes | None]:
    initial = state.initial_state[0]
    name = state.input_name
    if initial.data_type != state.data_type:
        raise InvalidArgumentError(
            f"The data type used for 'initial_state' field of state '{name}' does not match "
            "the state data type."
        )
    if not initial.name:
        raise InvalidArgumentError(
            f"Field 'name' must be set when using initial_state for state input '{name}'."
        )
    if len(initial.dims) != len(state.dims):
        raise InvalidArgumentError(
            "Number of dimensions in 'initial_state' doesn't match the size of 'state' "
            f"dimensions for state input '{name}'. {len(initial.dims)} != {len(state.dims)}"
        )
    for initial_dim, state_dim in zip(initial.dims, state.dims, strict=True):
        if initial_dim == -1:
            raise InvalidArgumentError(
                f"'initial_state' field for state input name '{name}' contains variable dimensions."
            )
        if state_dim != -1 and initial_dim != state_dim:
            raise InvalidArgumentError(
                f"'initial_state' dim for input name '{name}' doesn't match 'state' dim "
                f"description. {initial_dim} != {state_dim}"
            )
    dims = tuple(initial.dims)
    which = initial.WhichOneof("state_data")
    if which == "zero_data":
        return dims, None
    if which != "data_file":
        raise InvalidArgumentError(
            f"initial_state setting expects state'{name}' to have state_data set"
        )
    if model_dir is None:
        return dims, None  # checked offline without the model folder: zeros stand in
    path = model_dir / INITIAL_STATE_FOLDER / initial.data_file
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise InvalidArgumentError(
            f"failed to read initial_state data_file '{path}': {exc.strerror}"
        ) from None
    if datatype == "BYTES":
        return dims, content
    size = element_count(dims) * ITEM_SIZES[datatype]
    if size > len(content):
        raise InvalidArgumentError(
            f"initial_state setting expects {size} bytes, but the data provided from "
            f"{initial.data_file}only has {len(content)} bytes."
        )
    return dims, content[:size]


def _zeros(datatype: str, shape: tuple[int, ...]) -> bytes:
    count = element_count(shape)
    if datatype == "BYTES":
        return serialize_bytes([b""] * count)
    return bytes(count * ITEM_SIZES[datatype])
