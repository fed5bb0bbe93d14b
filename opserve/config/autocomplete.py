"""Auto-complete: fill a config's inputs, outputs and `max_batch_size` from the model, as Triton does.

The model is described by its backend inside a worker (the frontend imports no framework), as a
`ModelSignature`: full shapes with `-1` for dynamic dimensions.
"""

from __future__ import annotations

from opserve.datatypes import v2_to_config
from opserve.proto import ModelConfig, model_config_pb2
from opserve.signature import ModelSignature, TensorSpec

DEFAULT_MAX_BATCH_SIZE = 4
# backends whose auto-complete turns on the dynamic batcher for a model that can batch
# (Triton's onnxruntime and tensorflow backends, `AutoCompleteMaxBatch`)
DYNAMIC_BATCHING_BACKENDS = frozenset({"onnxruntime", "tensorflow"})


def autocomplete(
    config: ModelConfig,
    signature: ModelSignature,
    default_max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
) -> list[str]:
    """Fill what the config lacks from the model; returns what was filled, for the log.

    `max_batch_size` is filled (with 4) only while the config leaves its inputs or outputs to
    auto-complete and every model tensor has a dynamic first dimension; a config that spells out
    its tensors keeps the batching it says. Where that auto-complete ran, a model that can batch
    with `max_batch_size` > 1 and no scheduler gets `dynamic_batching`, as Triton's onnxruntime
    and tensorflow backends give it.
    """
    filled: list[str] = []
    signature = _without_sequence_tensors(config, signature)
    io_unspecified = len(config.input) == 0 or len(config.output) == 0
    if (
        config.max_batch_size == 0
        and io_unspecified
        and signature.supports_batching()
        and default_max_batch_size > 0
    ):
        config.max_batch_size = default_max_batch_size
        filled.append(f"max_batch_size={default_max_batch_size}")
    if (
        config.backend in DYNAMIC_BATCHING_BACKENDS
        and io_unspecified
        and signature.supports_batching()
        and config.max_batch_size > 1
        and config.WhichOneof("scheduling_choice") is None
    ):
        config.dynamic_batching.SetInParent()
        filled.append("dynamic_batching")
    strip = 1 if config.max_batch_size > 0 else 0
    filled += _complete_tensors(config.input, signature.inputs, strip, "input")
    filled += _complete_tensors(config.output, signature.outputs, strip, "output")
    return filled


def _without_sequence_tensors(config: ModelConfig, signature: ModelSignature) -> ModelSignature:
    """The sequence batcher's control and state tensors are the server's, not the config's."""
    batcher = config.sequence_batching
    names = {c.name for c in batcher.control_input}
    names |= {s.input_name for s in batcher.state} | {s.output_name for s in batcher.state}
    if not names:
        return signature
    return ModelSignature(
        tuple(t for t in signature.inputs if t.name not in names),
        tuple(t for t in signature.outputs if t.name not in names),
    )


def _complete_tensors(
    configured, specs: tuple[TensorSpec, ...], strip: int, kind: str
) -> list[str]:
    filled: list[str] = []
    by_name = {spec.name: spec for spec in specs}
    if len(configured) == 0:
        for spec in specs:
            tensor = configured.add()
            tensor.name = spec.name
            filled.append(f"{kind} '{spec.name}'")
            _fill_tensor(tensor, spec, strip)
        return filled
    for tensor in configured:
        found = by_name.get(tensor.name)
        if found is None:
            continue
        if tensor.data_type == model_config_pb2.TYPE_INVALID or not tensor.dims:
            filled.append(f"{kind} '{tensor.name}' type/shape")
            _fill_tensor(tensor, found, strip)
    return filled


def _fill_tensor(tensor, spec: TensorSpec, strip: int) -> None:
    if tensor.data_type == model_config_pb2.TYPE_INVALID and spec.datatype:
        tensor.data_type = model_config_pb2.DataType.Value(v2_to_config(spec.datatype))
    if not tensor.dims and not tensor.HasField("reshape"):
        dims = list(spec.shape[strip:])
        if dims:
            tensor.dims.extend(dims)
        else:  # a model tensor of shape [batch]: the client sends [batch, 1], as in Triton
            tensor.dims.append(1)
            tensor.reshape.SetInParent()
