"""Triton's generate extension: `POST .../generate` and `.../generate_stream` (server-sent events).

A request is one flat JSON object. A key that names one of the model's inputs is that input: a
scalar or a flat list, shaped by the model's dims (the batch dimension included) as Triton does it:
fixed dims, innermost first, must divide the element count; the innermost `-1` takes what is
left, other `-1`s are 1. Every other key is a request parameter (string, integer, number or
boolean); `id` is also the request's id, and the keys of a `parameters` object count as top-level
keys. A response is one flat JSON object with sorted keys: `id` (when given), the model's name and
version, the response's parameters, then each output by name, its elements flattened (a single
element as a scalar, BYTES as text).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from opserve.datatypes import NUMPY_DTYPES, serialize_bytes
from opserve.errors import InvalidArgumentError
from opserve.frontends.http.codec import json_values
from opserve.inference import InferenceRequest, InferenceResponse, Tensor
from opserve.schema import ModelSchema, TensorSchema


def decode_generate(
    body: bytes, schema: ModelSchema, model_name: str, model_version: str
) -> InferenceRequest:
    try:
        header = orjson.loads(body) if body.strip() else {}
    except orjson.JSONDecodeError as exc:
        raise InvalidArgumentError(f"failed to parse the request JSON: {exc}") from None
    if not isinstance(header, dict):
        raise InvalidArgumentError("a generate request must be a JSON object")
    nested = header.pop("parameters", {})
    if not isinstance(nested, dict):
        raise InvalidArgumentError(
            "Expected JSON object for keyword: 'parameters': it is not a JSON object"
        )
    inputs: list[Tensor] = []
    parameters: dict[str, Any] = {}
    for name, value in [*header.items(), *nested.items()]:
        spec = schema.inputs.get(name)
        if spec is not None:
            inputs.append(_tensor(spec, value, schema.batching))
            continue
        if isinstance(value, (dict, list)) or value is None:
            raise InvalidArgumentError(
                f"parameter '{name}' has invalid type. It should be either 'int', 'bool', "
                "'float' or 'string'."
            )
        parameters[name] = value
    request_id = parameters.get("id", "")
    return InferenceRequest(model_name, model_version, inputs, None, str(request_id), parameters)


def generate_shape(dims: tuple[int, ...], count: int) -> tuple[int, ...] | None:
    """The shape `count` elements take under `dims` (with -1s), Triton's way; None if none."""
    shape = list(dims)
    left = count
    for dim in reversed(shape):
        if dim != -1:
            if dim == 0 or left % dim:
                return None
            left //= dim
    placed = False
    for index in reversed(range(len(shape))):
        if shape[index] == -1:
            shape[index] = 1 if placed else left
            placed = True
    if not placed and left != 1:
        return None
    return tuple(shape)


def _tensor(spec: TensorSchema, value: Any, batching: bool) -> Tensor:
    name, datatype = spec.name, spec.datatype
    values = value if isinstance(value, list) else [value]
    if any(isinstance(v, (list, dict)) for v in values):
        raise InvalidArgumentError(f"input '{name}' takes a scalar or a flat list")
    dims = ((-1,) if batching else ()) + spec.dims
    shape = generate_shape(dims, len(values))
    if shape is None:
        raise InvalidArgumentError(
            f"The schema can not convert input '{name}' to tensor with proper shape"
        )
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in values):
            raise InvalidArgumentError(f"input '{name}' takes strings")
        return Tensor(name, datatype, shape, serialize_bytes(values))
    dtype = NUMPY_DTYPES[datatype]
    assert dtype is not None
    wanted = (bool,) if datatype == "BOOL" else (int,) if dtype.kind in "iu" else (int, float)
    if not all(
        isinstance(v, wanted) and (datatype == "BOOL") == isinstance(v, bool) for v in values
    ):
        raise InvalidArgumentError(f"input '{name}' takes {datatype} values, not {value!r}")
    try:
        data = np.array(values, dtype=dtype).tobytes()
    except OverflowError as exc:
        raise InvalidArgumentError(f"input '{name}': a value is out of range: {exc}") from None
    return Tensor(name, datatype, shape, data)


def encode_generate(response: InferenceResponse) -> bytes:
    body: dict[str, Any] = dict(response.parameters)
    body["model_name"] = response.model_name
    body["model_version"] = response.model_version
    if response.id:
        body["id"] = response.id
    for tensor in response.outputs:
        values = json_values(tensor)
        body[tensor.name] = values[0] if len(values) == 1 else values
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def server_sent_event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"
