"""Triton's generate extension: `POST .../generate` and `.../generate_stream` (server-sent events).

A request is one flat JSON object: each key but `id` and `parameters` names an input, its value a
scalar or a (nested) list; the shape is the value's own (a scalar is `[1]`), with a batch
dimension of 1 in front for a model that batches. A response is one flat JSON object too: the
model's name and version, then each output by name, its elements flattened, a single element as
a scalar and BYTES as text.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from opserve.datatypes import NUMPY_DTYPES, serialize_bytes
from opserve.errors import InvalidArgumentError
from opserve.frontends.http.codec import json_values
from opserve.inference import InferenceRequest, InferenceResponse, Tensor
from opserve.schema import ModelSchema


def decode_generate(
    body: bytes, schema: ModelSchema, model_name: str, model_version: str
) -> InferenceRequest:
    try:
        header = orjson.loads(body) if body.strip() else {}
    except orjson.JSONDecodeError as exc:
        raise InvalidArgumentError(f"failed to parse the request JSON: {exc}") from None
    if not isinstance(header, dict):
        raise InvalidArgumentError("a generate request must be a JSON object")
    parameters = header.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidArgumentError("'parameters' must be a JSON object")
    request_id = header.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgumentError("'id' must be a string")
    inputs = []
    for name, value in header.items():
        if name in ("id", "parameters"):
            continue
        spec = schema.inputs.get(name)
        if spec is None:
            raise InvalidArgumentError(
                f"unexpected key '{name}' for model '{model_name}': it is neither one of its "
                f"inputs ({', '.join(sorted(schema.inputs))}) nor 'id' or 'parameters'"
            )
        inputs.append(_tensor(name, spec.datatype, value, schema.batching))
    return InferenceRequest(model_name, model_version, inputs, None, request_id, parameters)


def _tensor(name: str, datatype: str, value: Any, batching: bool) -> Tensor:
    try:
        array = np.array(value, dtype=np.object_ if datatype == "BYTES" else None)
    except ValueError as exc:
        raise InvalidArgumentError(f"input '{name}': ragged or malformed data: {exc}") from None
    if array.ndim == 0:
        array = array.reshape(1)
    shape = ((1,) if batching else ()) + tuple(array.shape)
    if datatype == "BYTES":
        flat = array.reshape(-1).tolist()
        if not all(isinstance(e, str) for e in flat):
            raise InvalidArgumentError(f"input '{name}' takes strings")
        return Tensor(name, datatype, shape, serialize_bytes(flat))
    dtype = NUMPY_DTYPES[datatype]
    if array.dtype.kind not in "biuf" or (datatype == "BOOL") != (array.dtype.kind == "b"):
        raise InvalidArgumentError(f"input '{name}' takes {datatype} values, not {value!r}")
    return Tensor(name, datatype, shape, array.astype(dtype).tobytes())


def encode_generate(response: InferenceResponse) -> bytes:
    body: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
    }
    if response.id:
        body["id"] = response.id
    for tensor in response.outputs:
        values = json_values(tensor)
        body[tensor.name] = values[0] if len(values) == 1 else values
    return orjson.dumps(body)


def server_sent_event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"
