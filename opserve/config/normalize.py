"""The defaults Triton writes into every model's config, so that `/config` shows them.

Read from Triton 2.51's core (`src/model_config_utils.cc`): `NormalizeModelConfig` (the version
policy, the preferred batch size, the sequence batcher's defaults, pinned memory) and
`NormalizeInstanceGroup` with `SetDefaultInstanceCount` (a group's name, kind and count). Pure
functions over the config; which GPUs exist is the caller's to say.
"""

from __future__ import annotations

from pathlib import Path

from opserve.proto import ModelConfig, model_config_pb2
from opserve.sequence_config import fill_sequence_defaults

_Group = model_config_pb2.ModelInstanceGroup
# backends whose CPU groups default to two instances (Triton's `default_cpu_instance_count`)
TWO_CPU_INSTANCES = frozenset({"onnxruntime", "tensorflow"})
DEFAULT_CPU_INSTANCE_COUNT = 2


def visible_gpus() -> frozenset[int]:
    """The ids of the NVIDIA GPUs this machine shows (none without a driver)."""
    folder = Path("/proc/driver/nvidia/gpus")
    try:
        return frozenset(range(sum(1 for _ in folder.iterdir())))
    except OSError:
        return frozenset()


def normalize_model_config(config: ModelConfig) -> None:
    """Triton's `NormalizeModelConfig`: run before a model loads and again after its backend
    completed the config."""
    if not config.version_policy.WhichOneof("policy_choice"):
        config.version_policy.latest.num_versions = 1
    batching = config.dynamic_batching
    if config.HasField("dynamic_batching") and not batching.preferred_batch_size:
        if config.max_batch_size > 0:
            batching.preferred_batch_size.append(config.max_batch_size)
    if config.HasField("sequence_batching"):
        fill_sequence_defaults(config)
    if not config.HasField("ensemble_scheduling"):
        optimization = config.optimization
        if not optimization.HasField("input_pinned_memory"):
            optimization.input_pinned_memory.enable = True
        if not optimization.HasField("output_pinned_memory"):
            optimization.output_pinned_memory.enable = True


def normalize_instance_groups(config: ModelConfig, gpus: frozenset[int]) -> None:
    """Triton's `NormalizeInstanceGroup` (no backend here declares preferred groups): a config
    without groups gets one named after the model; a group without a name is
    `<model>_<its index>`; KIND_AUTO becomes KIND_GPU only where every GPU it lists exists;
    a count below 1 becomes 1 (2 for CPU groups of onnxruntime and tensorflow); a GPU group
    without `gpus` gets every GPU."""
    if config.HasField("ensemble_scheduling"):
        return
    if not config.instance_group:
        config.instance_group.add(name=config.name)
    for index, group in enumerate(config.instance_group):
        if not group.name:
            group.name = f"{config.name}_{index}"
        if group.kind == _Group.KIND_AUTO:
            on_gpu = bool(gpus) and all(gpu in gpus for gpu in group.gpus)
            group.kind = _Group.KIND_GPU if on_gpu else _Group.KIND_CPU
        if group.count < 1:
            two = group.kind == _Group.KIND_CPU and config.backend in TWO_CPU_INSTANCES
            group.count = DEFAULT_CPU_INSTANCE_COUNT if two else 1
        if group.kind == _Group.KIND_GPU and not group.gpus:
            group.gpus.extend(sorted(gpus))
