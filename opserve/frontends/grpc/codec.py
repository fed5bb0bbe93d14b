"""ModelInfer messages <-> protocol-free requests and responses.

Tensors arrive in `raw_input_contents` (one entry per input, the binary extension's layout) or in
the typed `contents` fields; responses always use `raw_output_contents`, as Triton does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from opserve.datatypes import NUMPY_DTYPES, element_count, serialize_bytes
from opserve.errors import InvalidArgumentError, UnsupportedError
from opserve.inference import InferenceRequest, InferenceResponse, Tensor
from opserve.proto import service_pb2

# datatype -> the InferTensorContents field that carries it
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def parameter_value(parameter: Any) -> Any:
    """An InferParameter's value as Python."""
    which = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, which) if which else None


def decode_infer_request(request: Any) -> InferenceRequest:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgumentError(
            f"expected {len(request.inputs)} raw input contents, one per input, but got {len(raw)}"
        )
    inputs = []
    for index, tensor in enumerate(request.inputs):
        if "shared_memory_region" in tensor.parameters:
            raise UnsupportedError("shared memory inputs are not supported by this server")
        if tensor.datatype not in NUMPY_DTYPES:
            raise InvalidArgumentError(
                f"input '{tensor.name}' has an unknown datatype: {tensor.datatype!r}"
            )
        shape = tuple(int(d) for d in tensor.shape)
        data = raw[index] if raw else _typed_contents(tensor)
        inputs.append(Tensor(tensor.name, tensor.datatype, shape, data))
    for output in request.outputs:
        if "shared_memory_region" in output.parameters:
            raise UnsupportedError("shared memory outputs are not supported by this server")
        if "classification" in output.parameters:
            raise UnsupportedError("classification outputs are not supported by this server")
    requested = [o.name for o in request.outputs] or None
    parameters = {k: parameter_value(v) for k, v in request.parameters.items()}
    return InferenceRequest(
        request.model_name, request.model_version, inputs, requested, request.id, parameters
    )


def _typed_contents(tensor: Any) -> bytes:
    field = _CONTENTS_FIELD.get(tensor.datatype)
    if field is None and element_count(tensor.shape) == 0:
        return b""
    if field is None:
        raise InvalidArgumentError(
            f"input '{tensor.name}': {tensor.datatype} data must be sent in raw_input_contents"
        )
    values = getattr(tensor.contents, field)
    if tensor.datatype == "BYTES":
        return serialize_bytes(values)
    dtype = NUMPY_DTYPES[tensor.datatype]
    try:
        return np.array(values, dtype=dtype).tobytes()
    except OverflowError as exc:
        raise InvalidArgumentError(
            f"input '{tensor.name}': a value is out of range: {exc}"
        ) from None


def encode_infer_response(response: InferenceResponse) -> Any:
    message = service_pb2.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id
    )
    for tensor in response.outputs:
        output = message.outputs.add()
        output.name = tensor.name
        output.datatype = tensor.datatype
        output.shape.extend(tensor.shape)
        message.raw_output_contents.append(bytes(tensor.data))
    return message
