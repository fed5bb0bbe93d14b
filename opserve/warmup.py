"""`model_warmup`: the samples every instance runs before its version is READY.

As in Triton, a sample of `batch_size` N on a batching model is N requests of batch 1 executed
together (one request with the sample's dims on a model without batching), `count` times (at
least once). Data is `zero_data`, `random_data` (uniform in [0, 1) for floating types, random
bits for the others; empty strings for BYTES) or `input_data_file`, a file in the model's
`warmup/` folder holding the raw data of one batch-1 request (length-prefixed elements for BYTES).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from opserve.datatypes import (
    ITEM_SIZES,
    config_to_v2,
    count_bytes_elements,
    element_count,
    serialize_bytes,
)
from opserve.errors import InvalidArgumentError
from opserve.inference import InferenceRequest, Tensor
from opserve.proto import ModelConfig, model_config_pb2
from opserve.schema import ModelSchema, TensorSchema

_FLOATING = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}


@dataclass(frozen=True)
class WarmupSample:
    name: str
    count: int  # how many times the batch executes
    requests: list[InferenceRequest]  # executed together, as one batch


def warmup_samples(config: ModelConfig, schema: ModelSchema, model_dir: Path) -> list[WarmupSample]:
    """The config's warm-up samples, ready to execute; an invalid one is an error naming it."""
    samples = []
    for index, sample in enumerate(config.model_warmup):
        name = sample.name or f"sample {index}"
        try:
            samples.append(_sample(config.name, name, sample, schema, model_dir))
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(
                f"warm-up sample '{name}' is invalid: {exc.message}"
            ) from None
    return samples


def _sample(
    model: str,
    name: str,
    sample: model_config_pb2.ModelWarmup,
    schema: ModelSchema,
    model_dir: Path,
) -> WarmupSample:
    if sample.batch_size < 1 or (not schema.batching and sample.batch_size != 1):
        limit = (
            f"1 to {schema.max_batch_size}" if schema.batching else "1 (the model does not batch)"
        )
        raise InvalidArgumentError(f"batch_size {sample.batch_size} must be {limit}")
    if sample.batch_size > max(schema.max_batch_size, 1):
        raise InvalidArgumentError(
            f"batch_size {sample.batch_size} exceeds max_batch_size {schema.max_batch_size}"
        )
    tensors = []
    for input_name, data in sample.inputs.items():
        spec = schema.inputs.get(input_name)
        if spec is None:
            raise InvalidArgumentError(f"'{input_name}' is not an input of model '{model}'")
        tensors.append(_tensor(spec, data, schema.batching, model_dir))
    missing = schema.required_inputs - set(sample.inputs)
    if missing:
        raise InvalidArgumentError(f"no data for the input(s) {sorted(missing)}")
    requests = [
        InferenceRequest(model, "", list(tensors), id=f"warmup {name}")
        for _ in range(sample.batch_size)
    ]
    return WarmupSample(name, max(sample.count, 1), requests)


def _tensor(
    spec: TensorSchema, data: model_config_pb2.ModelWarmup.Input, batching: bool, model_dir: Path
) -> Tensor:
    datatype = config_to_v2(model_config_pb2.DataType.Name(data.data_type))
    if datatype != spec.datatype:
        raise InvalidArgumentError(
            f"input '{spec.name}' has data type {datatype}, but the model expects {spec.datatype}"
        )
    dims = tuple(data.dims)
    if any(d < 1 for d in dims) or not spec.shape_matches(dims):
        raise InvalidArgumentError(
            f"dims {list(dims)} of input '{spec.name}' do not fit the config's {list(spec.dims)}"
        )
    count = element_count(dims)
    source = data.WhichOneof("input_data_type")
    if source == "input_data_file":
        raw = _read_file(model_dir / "warmup" / data.input_data_file, spec, count)
    elif datatype == "BYTES":
        raw = serialize_bytes([b""] * count)
    elif source == "random_data" and datatype in _FLOATING:
        values = np.random.default_rng().random(count).astype(_FLOATING[datatype])
        raw = values.tobytes()
    elif source == "random_data":
        raw = np.random.default_rng().bytes(count * ITEM_SIZES[datatype])
    else:  # zero_data (also what Triton uses when no source is set)
        raw = bytes(count * ITEM_SIZES[datatype])
    shape = spec.reshape if spec.reshape is not None else dims
    return Tensor(spec.name, datatype, ((1,) if batching else ()) + shape, raw)


def _read_file(path: Path, spec: TensorSchema, count: int) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InvalidArgumentError(
            f"cannot read input_data_file '{path}' of input '{spec.name}': {exc.strerror}"
        ) from None
    if spec.datatype == "BYTES":
        try:
            got = count_bytes_elements(raw)
        except InvalidArgumentError:
            got = -1
        if got != count:
            raise InvalidArgumentError(
                f"input_data_file '{path}' must hold {count} length-prefixed elements"
            )
        return raw
    expected = count * ITEM_SIZES[spec.datatype]
    if len(raw) != expected:
        raise InvalidArgumentError(
            f"input_data_file '{path}' holds {len(raw)} bytes; input '{spec.name}' needs {expected}"
        )
    return raw
