"""ModelInfer messages <-> protocol-free requests and responses.

Tensors arrive in `raw_input_contents` (one entry per input, the binary extension's layout) or in
the typed `contents` fields, or in a registered shared-memory region (`shared_memory_region`,
`shared_memory_offset`, `shared_memory_byte_size`; such an input has no raw entry). Responses
always use `raw_output_contents`, as Triton does; an output in shared memory has an empty one.
"""

from __future__ import annotations

import functools
from collections.abc import Container
from typing import Any

import numpy as np

from opserve.datatypes import NUMPY_DTYPES, element_count, serialize_bytes
from opserve.errors import InvalidArgumentError
from opserve.inference import InferenceRequest, InferenceResponse, Tensor
from opserve.proto import service_pb2
from opserve.shared_memory import PendingLeases, RegionLeases, SharedMemoryRegistry

# each InferTensorContents field, the datatype it carries, and the narrower datatypes it also
# carries (Triton keeps the low bytes of each 32-bit value for those)
_CONTENTS_FIELDS = (
    ("bool_contents", "BOOL", ()),
    ("int_contents", "INT32", ("INT8", "INT16")),
    ("int64_contents", "INT64", ()),
    ("uint_contents", "UINT32", ("UINT8", "UINT16")),
    ("uint64_contents", "UINT64", ()),
    ("fp32_contents", "FP32", ()),
    ("fp64_contents", "FP64", ()),
    ("bytes_contents", "BYTES", ()),
)
_CARRIED = frozenset(t for _, carried, narrower in _CONTENTS_FIELDS for t in (carried, *narrower))


def parameter_value(parameter: Any) -> Any:
    """An InferParameter's value as Python."""
    which = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, which) if which else None


def decode_infer_request(
    request: Any, shared_memory: SharedMemoryRegistry | None = None
) -> tuple[InferenceRequest, RegionLeases | None]:
    """The request, and its leases when it has tensors in shared memory (the caller releases
    them when the request is over)."""
    leases = PendingLeases(shared_memory)
    try:
        return _decode_infer_request(request, leases), leases.taken
    except BaseException:
        leases.release()
        raise


def _decode_infer_request(request: Any, leases: PendingLeases) -> InferenceRequest:
    # each field of the message is read once: every read of a protobuf field builds an object
    raw = request.raw_input_contents
    model = request.model_name
    tensors = list(request.inputs)
    placements = [_shared_memory(t) if t.parameters else None for t in tensors]
    if raw:
        for tensor, placement in zip(tensors, placements, strict=True):
            if placement is None and tensor.HasField("contents"):  # Triton's words
                raise InvalidArgumentError(
                    "contents field must not be specified when using raw_input_contents for "
                    f"'{tensor.name}' for model '{model}'"
                )
        expected = placements.count(None)  # inputs in shared memory have no entry
        if len(raw) != expected:
            raise InvalidArgumentError(
                f"expected {expected} raw input contents, one per input not in shared memory, "
                f"but got {len(raw)}"
            )
    inputs = []
    index = 0
    for tensor, placement in zip(tensors, placements, strict=True):
        name, datatype = tensor.name, tensor.datatype
        if datatype not in NUMPY_DTYPES:
            raise InvalidArgumentError(f"input '{name}' has an unknown datatype: {datatype!r}")
        data: bytes | memoryview
        if placement is not None:
            if tensor.HasField("contents"):  # Triton's words
                raise InvalidArgumentError(
                    "unexpected 'content' provided when using shared memory for input tensor "
                    f"'{name}' for model '{model}'"
                )
            data = leases.get().input(*placement)
        elif raw:
            data = raw[index]
            index += 1
        else:
            data = _typed_contents(tensor, model)
        inputs.append(Tensor(name, datatype, tuple(tensor.shape), data))
    requested = None
    buffers = {}
    classification = {}
    outputs = request.outputs
    if outputs:
        for output in outputs:
            parameters = output.parameters
            if not parameters:
                continue
            placement = _shared_memory(output)
            if "classification" in parameters:
                classification[output.name] = _classification(parameters["classification"])
            if placement is not None:
                if "classification" in parameters:  # Triton's words
                    raise InvalidArgumentError(
                        "output can't set both 'shared_memory_region' and 'classification'"
                    )
                buffers[output.name] = leases.get().output(output.name, *placement)
        requested = [o.name for o in outputs]
    given = request.parameters
    parameters = {k: parameter_value(v) for k, v in given.items()} if given else {}
    inference = InferenceRequest(
        model, request.model_version, inputs, requested, request.id, parameters
    )
    if buffers:
        inference.output_buffers = dict(buffers)
    if classification:
        inference.classification = classification
    return inference


def _classification(parameter: Any) -> int:
    """A requested output's class count, checked with Triton's words."""
    if parameter.WhichOneof("parameter_choice") != "int64_param":
        raise InvalidArgumentError(
            "invalid value type for 'classification' parameter, expected int64_param"
        )
    if parameter.int64_param <= 0:
        raise InvalidArgumentError("invalid value for 'classification' parameter, expected >= 0")
    return int(parameter.int64_param)


def _shared_memory(tensor: Any) -> tuple[str, int, int] | None:
    """A tensor's region, offset and byte size when its parameters place it in shared memory
    (checked with Triton's words)."""
    parameters = tensor.parameters
    has_region = "shared_memory_region" in parameters
    values = {}
    for key, kind in (
        ("shared_memory_region", "string_param"),
        ("shared_memory_offset", "int64_param"),
        ("shared_memory_byte_size", "int64_param"),
    ):
        if key not in parameters:
            continue
        if not has_region:
            raise InvalidArgumentError(
                f"'{key}' can not be specified without 'shared_memory_region' parameter for "
                f"tensor '{tensor.name}'"
            )
        if parameters[key].WhichOneof("parameter_choice") != kind:
            raise InvalidArgumentError(
                f"invalid value type for '{key}' parameter for tensor '{tensor.name}', "
                f"expected {kind}."
            )
        values[key] = getattr(parameters[key], kind)
    if not has_region:
        return None
    if "shared_memory_byte_size" not in values:
        raise InvalidArgumentError(
            "'shared_memory_byte_size' must be specified along with 'shared_memory_region' "
            f"parameter for tensor '{tensor.name}'"
        )
    return (
        values["shared_memory_region"],
        values.get("shared_memory_offset", 0),
        values["shared_memory_byte_size"],
    )


def _typed_contents(tensor: Any, model: str) -> bytes:
    """An input's data from the typed `contents` fields, read as Triton reads them: one field
    only, the one of the input's datatype (`int_contents` / `uint_contents` also carry the 8- and
    16-bit integers, each value cut to its low bytes)."""
    data = b""
    supplied = False
    for field, carried, narrower in _CONTENTS_FIELDS:
        values = getattr(tensor.contents, field)
        if not values:
            continue
        if supplied:  # Triton's words
            raise InvalidArgumentError(
                f"unexpected explicit tensor data for input tensor '{tensor.name}' for model "
                f"'{model}', binary data was already supplied."
            )
        datatype = tensor.datatype if tensor.datatype in narrower else carried
        if datatype != tensor.datatype:
            raise InvalidArgumentError(
                f"unexpected explicit tensor data for input tensor '{tensor.name}' for model "
                f"'{model}' of type '{carried}', expected datatype '{tensor.datatype}'"
            )
        if datatype == "BYTES":
            data = serialize_bytes(values)
        else:
            wide = np.array(values, dtype=NUMPY_DTYPES[carried])
            data = wide.astype(NUMPY_DTYPES[datatype]).tobytes()  # C's cast: the low bytes
        supplied = True
    if not supplied and tensor.datatype not in _CARRIED and element_count(tensor.shape):
        raise InvalidArgumentError(
            f"input '{tensor.name}': {tensor.datatype} data must be sent in raw_input_contents"
        )
    return data


class InferAnswer:
    """A `ModelInferResponse` whose raw output contents stay the tensors' own bytes: it
    serializes as the message without them (`head`, serialized) followed by one
    `raw_output_contents` field per output (field order does not matter to a protobuf reader),
    so a large output is not copied into the message and again into its serialization."""

    __slots__ = ("head", "raw")

    def __init__(self, head: bytes, raw: list[bytes | memoryview]) -> None:
        self.head = head
        self.raw = raw

    def serialized_parts(self) -> list[bytes | memoryview]:
        parts: list[bytes | memoryview] = [self.head]
        for data in self.raw:
            parts.append(_raw_entry_head(len(data)))
            parts.append(data)
        return parts

    def SerializeToString(self) -> bytes:  # noqa: N802 (protobuf's name)
        return b"".join(self.serialized_parts())


_RAW_OUTPUT_TAG = bytes([(6 << 3) | 2])  # field 6 (raw_output_contents), length-delimited


def varint(value: int) -> bytes:
    """An unsigned protobuf varint."""
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


@functools.lru_cache(maxsize=256)
def _raw_entry_head(size: int) -> bytes:
    return _RAW_OUTPUT_TAG + varint(size)


@functools.lru_cache(maxsize=256)
def _answer_head(
    model_name: str,
    model_version: str,
    request_id: str,
    outputs: tuple[tuple[str, str, tuple[int, ...]], ...],
) -> bytes:
    """An answer's fields but the raw contents, serialized: a model answers a client in a
    steady state with the same ones every time, so they are remembered."""
    message = service_pb2.ModelInferResponse(
        model_name=model_name, model_version=model_version, id=request_id
    )
    for name, datatype, shape in outputs:
        output = message.outputs.add()
        output.name = name
        output.datatype = datatype
        output.shape.extend(shape)
    return message.SerializeToString()  # type: ignore[no-any-return]


def encode_infer_answer(
    response: InferenceResponse, in_shared_memory: Container[str] = ()
) -> InferAnswer:
    """`encode_infer_response` for a unary answer, its raw contents kept apart."""
    outputs = response.outputs
    head = _answer_head(
        response.model_name,
        response.model_version,
        response.id,
        tuple([(t.name, t.datatype, tuple(t.shape)) for t in outputs]),
    )
    return InferAnswer(head, [b"" if t.name in in_shared_memory else t.data for t in outputs])


def encode_infer_response(
    response: InferenceResponse, in_shared_memory: Container[str] = ()
) -> Any:
    """The response; an output in shared memory has an empty raw entry, as in Triton."""
    message = service_pb2.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id
    )
    for tensor in response.outputs:
        output = message.outputs.add()
        output.name = tensor.name
        output.datatype = tensor.datatype
        output.shape.extend(tensor.shape)
        shared = tensor.name in in_shared_memory
        message.raw_output_contents.append(b"" if shared else bytes(tensor.data))
    return message
