"""Auto-complete: fill a config's inputs, outputs and `max_batch_size` from the model, as Triton does.

The model is described by its backend inside a worker (the frontend imports no framework), as a
`ModelSignature`: full shapes with `-1` for dynamic dimensions.
"""

from __future__ import annotations

from opserve.datatypes import v2_to_config
from opserve.proto import ModelConfig, model_config_pb2
from opserve.signature import ModelSignature, TensorSpec

DEFAULT_MAX_BATCH_SIZE = 4


def autocomplete(
    config: ModelConfig,
    signature: ModelSignature,
    default_max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
) -> list[str]:
    """Fill what the config lacks from the model; returns what was filled, for the log.

    `max_batch_size` is filled (with 4) only while the config leaves its inputs or outputs to
    auto-complete and every model tensor has a dynamic first dimension; a config that spells out
    its tensors keeps the batching it says.
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
    strip = 1 if config.max_batch_size > 0 else 0
    filled += _complete_tensors(config.input, signature.inputs, strip, "input")
    filled += _complete_tensors(config.output, signature.outputs, strip, "output")
    if not config.version_policy.WhichOneof("policy_choice"):
        config.version_policy.latest.num_versions = 1
    if not config.instance_group:
        group = config.instance_group.add()
        group.name = config.name
        group.count = 1
        group.kind = model_config_pb2.ModelInstanceGroup.KIND_CPU
    for number, group in enumerate(config.instance_group):
        if not group.name:  # Triton names a group `<model>_<its index>`
            group.name = f"{config.name}_{number}"
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
