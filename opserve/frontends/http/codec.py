"""V2 HTTP inference bodies: JSON tensors and the binary tensor data extension, both directions.

A request body is a JSON header, optionally followed by binary tensor data; the header's length
is given by `Inference-Header-Content-Length`. Inputs with `parameters.binary_data_size` take
their data, in order, from what follows the header. Outputs come back in binary when asked
(`parameters.binary_data` per output, or `binary_data_output` for the request). Tensors with
`shared_memory_region` (Triton's shared-memory extension) are views of a registered region; an
output placed there comes back without data.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from opserve.datatypes import NUMPY_DTYPES, deserialize_bytes, serialize_bytes
from opserve.errors import InvalidArgumentError
from opserve.inference import InferenceRequest, InferenceResponse, Tensor
from opserve.shared_memory import PendingLeases, RegionLeases, SharedMemoryRegistry

# The JSON values each datatype's elements may be: rapidjson's IsInt, IsNumber, IsBool as
# Triton checks them (a boolean is not a number, a fraction or an exponent is not an integer)
_INTEGERS = ("UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64")
_ELEMENT_TYPES: dict[str, frozenset[type]] = {"BOOL": frozenset({bool})}
_ELEMENT_TYPES.update({t: frozenset({int}) for t in _INTEGERS})
_ELEMENT_TYPES.update({t: frozenset({int, float}) for t in ("FP16", "FP32", "FP64", "BF16")})

# Triton's limit on how deep a tensor's `data` nests (its HTTP_MAX_JSON_NESTING_DEPTH: a value
# nested in 100 arrays is refused)
MAX_JSON_NESTING = 100
_NUMPY_DIMS = 32  # numpy 1's limit on an array's dimensions (numpy 2: 64)


@dataclass(slots=True)
class OutputFormat:
    """How the client wants each output: binary, JSON, or in a shared-memory region (then the
    response holds no data for it). `regions`: the request's leases, when it uses shared memory."""

    default_binary: bool = False
    binary: dict[str, bool] = field(default_factory=dict)
    shared_memory: set[str] = field(default_factory=set)
    regions: RegionLeases | None = None

    def is_binary(self, name: str) -> bool:
        return self.binary.get(name, self.default_binary)


def decode_request(
    body: bytes,
    header_length: int | None,
    model_name: str,
    model_version: str,
    shared_memory: SharedMemoryRegistry | None = None,
) -> tuple[InferenceRequest, OutputFormat]:
    """Parse a V2 inference request body (JSON, or JSON + binary tensors). Tensors in shared
    memory are leased from `shared_memory`: the caller releases `OutputFormat.regions`."""
    leases = PendingLeases(shared_memory)
    try:
        return _decode_request(body, header_length, model_name, model_version, leases)
    except BaseException:
        leases.release()
        raise


def _decode_request(
    body: bytes,
    header_length: int | None,
    model_name: str,
    model_version: str,
    leases: PendingLeases,
) -> tuple[InferenceRequest, OutputFormat]:
    if header_length is None:
        header_length = len(body)
    elif not 0 <= header_length <= len(body):
        raise InvalidArgumentError(
            f"Inference-Header-Content-Length {header_length} is outside the body of {len(body)} bytes"
        )
    elif header_length == 0:  # the binary extension's raw request: the body is the one input
        whole = Tensor("raw_input", "", (), memoryview(body))
        request = InferenceRequest(model_name, model_version, [whole], raw_input=True)
        return request, OutputFormat(default_binary=True)
    try:
        header = orjson.loads(memoryview(body)[:header_length])
    except orjson.JSONDecodeError as exc:
        raise InvalidArgumentError(f"failed to parse the request JSON: {exc}") from None
    if not isinstance(header, dict):
        raise InvalidArgumentError("the inference request must be a JSON object")
    parameters = _object(header.get("parameters"), "parameters")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list):
        raise InvalidArgumentError("the inference request must have an 'inputs' array")
    binary = memoryview(body)[header_length:]
    offset = 0
    inputs: list[Tensor] = []
    for raw in raw_inputs:
        tensor, used = _decode_input(raw, binary, offset, leases)
        inputs.append(tensor)
        offset += used
    if offset != len(binary):
        raise InvalidArgumentError(
            f"the request carries {len(binary)} bytes of binary tensor data, but its inputs' "
            f"binary_data_size add up to {offset}"
        )
    output_format = OutputFormat(default_binary=_flag(parameters, "binary_data_output"))
    requested: list[str] | None = None
    raw_outputs = header.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise InvalidArgumentError("'outputs' must be an array")
        requested = []
        classification: dict[str, int] = {}
        for raw in raw_outputs:
            raw = _object(raw, "output")
            name = raw.get("name")
            if not isinstance(name, str):
                raise InvalidArgumentError("every requested output needs a 'name'")
            out_parameters = _object(raw.get("parameters"), f"parameters of output '{name}'")
            placement = _shared_memory(name, out_parameters)
            if placement is not None:
                if "classification" in out_parameters:  # Triton's words
                    raise InvalidArgumentError(
                        "Output can't set both 'shared_memory_region' and 'classification'"
                    )
                if _flag(out_parameters, "binary_data"):
                    raise InvalidArgumentError(
                        "Output can't set both 'shared_memory_region' and 'binary_data'"
                    )
                leases.get().output(name, *placement)
                output_format.shared_memory.add(name)
            count = _classification(out_parameters)
            if count:
                classification[name] = count
            # a requested output is binary only when it says so (Triton: binary_data_output
            # sets the kind of the outputs that are not requested)
            output_format.binary[name] = _flag(out_parameters, "binary_data")
            requested.append(name)
    request_id = header.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgumentError("'id' must be a string")
    # binary_data_output is the protocol's business, not the model's (as in Triton)
    parameters = {k: v for k, v in parameters.items() if k != "binary_data_output"}
    for key, value in parameters.items():
        if not isinstance(value, (str, int, float)):  # a boolean is an int; Triton's words
            raise InvalidArgumentError(
                f"parameter '{key}' has invalid type. It should be either 'int', 'bool', or "
                "'string'."
            )
    request = InferenceRequest(model_name, model_version, inputs, requested, request_id, parameters)
    if requested and classification:
        request.classification = classification
    output_format.regions = leases.taken
    if leases.taken is not None and leases.taken.outputs:
        request.output_buffers = dict(leases.taken.outputs)
    return request, output_format


_INTS = frozenset([int])  # the type of every dimension (a JSON true is a bool: refused)
_SHARED_MEMORY_KEYS = frozenset(
    ["shared_memory_region", "shared_memory_offset", "shared_memory_byte_size"]
)


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgumentError(f"'{what}' must be a JSON object")
    return value


def _classification(parameters: dict[str, Any]) -> int:
    """An output's class count (0: its data, as it is)."""
    count = parameters.get("classification", 0)
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:  # Triton's words
        raise InvalidArgumentError(
            "Unable to set 'classification': attempt to access JSON non-unsigned-integer as "
            "unsigned-integer"
        )
    return count


def _flag(parameters: dict[str, Any], key: str) -> bool:
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"parameter '{key}' must be a boolean")
    return value


def _shared_memory(name: str, parameters: dict[str, Any]) -> tuple[str, int, int] | None:
    """A tensor's region, offset and byte size, when its parameters place it in shared memory."""
    if parameters.keys().isdisjoint(_SHARED_MEMORY_KEYS):
        return None
    region = parameters.get("shared_memory_region")
    for key in ("shared_memory_offset", "shared_memory_byte_size"):
        value = parameters.get(key)
        if value is None:
            continue
        if region is None:  # Triton's words (gRPC)
            raise InvalidArgumentError(
                f"'{key}' can not be specified without 'shared_memory_region' parameter for "
                f"tensor '{name}'"
            )
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidArgumentError(
                f"Unable to parse '{key}' of tensor '{name}': expected a non-negative integer"
            )
    if region is None:
        return None
    if not isinstance(region, str):
        raise InvalidArgumentError(
            f"Unable to parse 'shared_memory_region' of tensor '{name}': expected a string"
        )
    byte_size = parameters.get("shared_memory_byte_size")
    if byte_size is None:
        raise InvalidArgumentError(
            "'shared_memory_byte_size' must be specified along with 'shared_memory_region' "
            f"parameter for tensor '{name}'"
        )
    return region, parameters.get("shared_memory_offset", 0), byte_size


def _decode_input(
    raw: Any, binary: memoryview, offset: int, leases: PendingLeases
) -> tuple[Tensor, int]:
    raw = _object(raw, "input")
    name, datatype, shape = raw.get("name"), raw.get("datatype"), raw.get("shape")
    if not isinstance(name, str):
        raise InvalidArgumentError("every input needs a 'name'")
    if not isinstance(datatype, str) or datatype not in NUMPY_DTYPES:
        raise InvalidArgumentError(f"input '{name}' has an unknown datatype: {datatype!r}")
    if not isinstance(shape, list) or not _INTS.issuperset(map(type, shape)):
        raise InvalidArgumentError(f"input '{name}' needs a 'shape' array of integers")
    parameters = _object(raw.get("parameters"), f"parameters of input '{name}'")
    placement = _shared_memory(name, parameters)
    if placement is not None:
        if "data" in raw or "binary_data_size" in parameters:  # Triton's words
            given = " 'data'" if "data" in raw else ""
            given += " 'binary_data_size'" if "binary_data_size" in parameters else ""
            raise InvalidArgumentError(
                "Input must set only one of the following fields: 'data', 'binary_data_size' in "
                f"'parameters', 'shared_memory_region' in 'parameters'. But set{given} "
                "'shared_memory_region'"
            )
        return Tensor(name, datatype, tuple(shape), leases.get().input(*placement)), 0
    size = parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidArgumentError(
                f"input '{name}': binary_data_size must be a non-negative integer"
            )
        if "data" in raw:
            raise InvalidArgumentError(f"input '{name}' has both 'data' and binary_data_size")
        if offset + size > len(binary):
            raise InvalidArgumentError(
                f"input '{name}': binary_data_size {size} runs past the end of the request body"
            )
        return Tensor(name, datatype, tuple(shape), binary[offset : offset + size]), size
    if "data" not in raw:
        raise InvalidArgumentError(f"input '{name}' has neither 'data' nor binary_data_size")
    return Tensor(name, datatype, tuple(shape), _json_data(name, datatype, raw["data"])), 0


def _json_data(name: str, datatype: str, data: Any) -> bytes:
    if not isinstance(data, list):
        data = [data]
    elif _nesting(data) > _NUMPY_DIMS:  # deeper than numpy's arrays go: flattened first
        data = _flatten(data)
    if datatype == "BYTES":
        flat = _flatten(data)
        if not all(isinstance(e, str) for e in flat):
            raise InvalidArgumentError(f"input '{name}': BYTES data must be strings")
        return serialize_bytes(flat)
    dtype = NUMPY_DTYPES[datatype]
    assert dtype is not None  # only BYTES has no numpy dtype
    flat = data if not data or not isinstance(data[0], list) else _flatten(data)
    if not _ELEMENT_TYPES[datatype].issuperset(map(type, flat)):
        expected = (
            "booleans" if datatype == "BOOL" else "integers" if datatype in _INTEGERS else "numbers"
        )
        raise InvalidArgumentError(
            f"input '{name}': data of datatype {datatype} must be {expected}"
        )
    try:
        parsed = np.array(data)
    except ValueError as exc:
        raise InvalidArgumentError(f"input '{name}': ragged or malformed data: {exc}") from None
    if datatype == "BF16":  # the nearest BF16 of each value (ties to even), NaN kept quiet
        single = parsed.astype("<f4").reshape(-1)
        words = single.view("<u4")
        rounded = (words + 0x7FFF + ((words >> 16) & 1)) >> 16
        rounded = np.where(np.isnan(single), (words >> 16) | 0x40, rounded)
        return rounded.astype("<u2").tobytes()
    if datatype not in _INTEGERS:
        return parsed.astype(dtype).tobytes()
    try:
        converted = np.array(data, dtype=dtype)  # exact, and raises on values out of range
    except (OverflowError, ValueError, TypeError) as exc:
        raise InvalidArgumentError(
            f"input '{name}': a value is out of range for {datatype}: {exc}"
        ) from None
    return converted.tobytes()


def _nesting(data: list[Any]) -> int:
    """How deep the first element lies (the depth of a regular array; a ragged one is refused
    when parsed)."""
    depth = 0
    while isinstance(data, list) and data:
        data = data[0]
        depth += 1
    if depth >= MAX_JSON_NESTING:
        raise _too_deep()
    return depth


def _flatten(data: list[Any]) -> list[Any]:
    """Every element, in order, at any depth below Triton's limit."""
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if len(stack) >= MAX_JSON_NESTING:  # the item's depth
                raise _too_deep()
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _too_deep() -> InvalidArgumentError:  # Triton's words
    return InvalidArgumentError(
        f"JSON nesting depth exceeds maximum allowed limit ({MAX_JSON_NESTING})"
    )


def encode_response(
    response: InferenceResponse, output_format: OutputFormat
) -> tuple[list[bytes | memoryview], int | None]:
    """The response body in parts (the JSON header, then each binary output as it is: written
    out as they are, not joined), and the header's length when binary data follows it."""
    described = []
    binary_parts: list[bytes | memoryview] = []
    for tensor in response.outputs:
        name = tensor.name
        if name in output_format.shared_memory:  # its data is in the client's region
            described.append((name, tensor.datatype, tuple(tensor.shape), -1))
        elif output_format.is_binary(name):
            described.append((name, tensor.datatype, tuple(tensor.shape), len(tensor.data)))
            binary_parts.append(tensor.data)
        else:
            return _encode_with_json_data(response, output_format)
    header = _binary_header(
        response.model_name, response.model_version, response.id, tuple(described)
    )
    if not binary_parts:
        return [header], None
    return [header, *binary_parts], len(header)


@functools.lru_cache(maxsize=256)
def _binary_header(
    model_name: str,
    model_version: str,
    response_id: str,
    outputs: tuple[tuple[str, str, tuple[int, ...], int], ...],
) -> bytes:
    """The JSON header of a response whose outputs are all binary (a size) or in shared memory
    (-1): a model answers a client in a steady state with the same one every time."""
    entries = []
    for name, datatype, shape, size in outputs:
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(shape)}
        if size >= 0:
            entry["parameters"] = {"binary_data_size": size}
        entries.append(entry)
    body: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if response_id:
        body["id"] = response_id
    body["outputs"] = entries
    return orjson.dumps(body)


def _encode_with_json_data(
    response: InferenceResponse, output_format: OutputFormat
) -> tuple[list[bytes | memoryview], int | None]:
    """`encode_response` for a response with outputs whose data goes in the JSON."""
    outputs = []
    binary_parts: list[bytes | memoryview] = []
    for tensor in response.outputs:
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if tensor.name in output_format.shared_memory:
            pass  # its data is in the client's region
        elif output_format.is_binary(tensor.name):
            entry["parameters"] = {"binary_data_size": len(tensor.data)}
            binary_parts.append(tensor.data)
        else:
            entry["data"] = json_values(tensor)
        outputs.append(entry)
    body: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
    }
    if response.id:
        body["id"] = response.id
    body["outputs"] = outputs
    header = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    if not binary_parts:
        return [header], None
    return [header, *binary_parts], len(header)


def json_values(tensor: Tensor) -> list[Any]:
    if tensor.datatype == "BYTES":
        return [e.decode("utf-8", "replace") for e in deserialize_bytes(tensor.data)]
    if tensor.datatype == "BF16":
        words = np.frombuffer(tensor.data, dtype="<u2").astype("<u4") << 16
        return words.view("<f4").tolist()
    return np.frombuffer(tensor.data, dtype=NUMPY_DTYPES[tensor.datatype]).tolist()
