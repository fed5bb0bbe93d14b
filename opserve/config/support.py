"""Which `ModelConfig` fields opserve honours, refuses, or ignores with a warning: one table.

Every field of Triton's `ModelConfig` (at any depth) is covered by a rule, either its own or an
ancestor's (a test walks the message descriptors to keep it so). A field that is set and
*refused* makes the model UNAVAILABLE naming the field; one that is *ignored* draws a warning
(in the server's log and in `opserve check`) and may only be ignored where ignoring it cannot
change an answer. `docs/config-fields.md` is this table, rendered (`python -m
opserve.config.support` writes it; a test keeps it current).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from google.protobuf.message import Message

from opserve.proto import ModelConfig, model_config_pb2
from opserve.queues import priority_problems


class Verdict(str, Enum):
    HONOURED = "honoured"
    REFUSED = "refused"
    IGNORED = "ignored (warning)"


@dataclass(frozen=True)
class RuleContext:
    """What a rule may look at besides the field's value."""

    config: ModelConfig
    gpu_present: bool


@dataclass(frozen=True)
class FieldRule:
    path: str  # dotted field path; repeated and map fields name their elements' fields
    verdict: Verdict
    note: str = ""
    # for REFUSED / IGNORED: whether the rule applies to this value (default: whenever set)
    applies: Callable[[Any, RuleContext], bool] | None = None
    # for a HONOURED message: its subfields are honoured too (no rules of their own needed)
    whole: bool = False


@dataclass
class Findings:
    errors: list[str]
    warnings: list[str]


_GPU = model_config_pb2.ModelInstanceGroup.KIND_GPU

# backend parameters that the framework backends read (Python models get every parameter)
BACKEND_PARAMETERS: dict[str, frozenset[str]] = {
    "onnxruntime": frozenset({"intra_op_thread_count", "inter_op_thread_count", "allow_spinning"}),
    "pytorch": frozenset(),
    "tensorflow": frozenset(),
}
# parameters opserve itself reads, whatever the backend
SERVER_PARAMETERS = frozenset(
    {"EXECUTION_ENV_PATH", "EXECUTION_TIMEOUT_SECS", "OP_LIBRARY_SOURCES", "SHARED_WORKER"}
)


def _not_onnx(_: Any, ctx: RuleContext) -> bool:
    return ctx.config.backend != "onnxruntime"


def _no_gpu_backend(_: Any, ctx: RuleContext) -> bool:
    """Only the PyTorch backend runs on a GPU, and only where one is present."""
    return not (ctx.gpu_present and ctx.config.backend == "pytorch")


def _gpu_kind(kind: int, ctx: RuleContext) -> bool:
    return kind == _GPU and _no_gpu_backend(kind, ctx)


def _unread_parameters(parameters: Any, ctx: RuleContext) -> bool:
    return bool(unread_parameters(ctx.config))


def _true(value: Any, _: RuleContext) -> bool:
    return bool(value)


H, R, W = Verdict.HONOURED, Verdict.REFUSED, Verdict.IGNORED

RULES: tuple[FieldRule, ...] = (
    FieldRule("name", H, "must match the model's folder"),
    FieldRule(
        "platform",
        H,
        "onnxruntime_onnx, pytorch_libtorch, tensorflow_savedmodel, tensorflow_graphdef, ensemble",
    ),
    FieldRule("backend", H, "onnxruntime, pytorch, tensorflow, python"),
    FieldRule("runtime", R, "a backend's shared library or runtime cannot be chosen here"),
    FieldRule("version_policy", H, "latest, all, specific", whole=True),
    FieldRule("max_batch_size", H),
    FieldRule("input", H, "the fields below"),
    FieldRule("input.name", H),
    FieldRule("input.data_type", H),
    FieldRule("input.format", H, "reported in the model's config; informational, as in Triton"),
    FieldRule("input.dims", H),
    FieldRule("input.reshape", H, whole=True),
    FieldRule("input.is_shape_tensor", R, "shape tensors are a TensorRT feature", _true),
    FieldRule(
        "input.allow_ragged_batch",
        R,
        "requests of different shapes are never batched together",
        _true,
    ),
    FieldRule("input.optional", H),
    FieldRule("input.is_non_linear_format_io", R, "a TensorRT feature", _true),
    FieldRule("output", H, "the fields below"),
    FieldRule("output.name", H),
    FieldRule("output.data_type", H),
    FieldRule("output.dims", H),
    FieldRule("output.reshape", H, whole=True),
    FieldRule(
        "output.label_filename",
        H,
        "the labels of the classification extension (a file in the model folder)",
    ),
    FieldRule("output.is_shape_tensor", R, "shape tensors are a TensorRT feature", _true),
    FieldRule("output.is_non_linear_format_io", R, "a TensorRT feature", _true),
    FieldRule("batch_input", R, "batch inputs (ragged batching) are not supported"),
    FieldRule("batch_output", R, "batch outputs (ragged batching) are not supported"),
    FieldRule("optimization", H, "the fields below"),
    FieldRule(
        "optimization.graph",
        W,
        "graph optimization levels are read by the onnxruntime backend only",
        _not_onnx,
    ),
    FieldRule("optimization.priority", W, "no effect on CPU workers"),
    FieldRule("optimization.cuda", W, "CUDA settings have no effect without GPU execution"),
    FieldRule(
        "optimization.execution_accelerators",
        R,
        "execution accelerators (TensorRT, OpenVINO) are not available; the model would run "
        "without the one it names",
    ),
    FieldRule("optimization.input_pinned_memory", W, "no effect without a GPU"),
    FieldRule("optimization.output_pinned_memory", W, "no effect without a GPU"),
    FieldRule("optimization.gather_kernel_buffer_threshold", W, "no effect without a GPU"),
    FieldRule("optimization.eager_batching", W, "no effect: batches are formed as documented"),
    FieldRule("dynamic_batching", H, "the fields below"),
    FieldRule("dynamic_batching.preferred_batch_size", H),
    FieldRule("dynamic_batching.max_queue_delay_microseconds", H),
    FieldRule(
        "dynamic_batching.preserve_ordering",
        W,
        "responses may return out of request order with several instances",
    ),
    FieldRule("dynamic_batching.priority_levels", H, "the request's `priority` parameter; 1 first"),
    FieldRule("dynamic_batching.default_priority_level", H),
    FieldRule(
        "dynamic_batching.default_queue_policy",
        H,
        "max_queue_size, timeout_action REJECT / DELAY, default_timeout_microseconds, "
        "allow_timeout_override",
        whole=True,
    ),
    FieldRule("dynamic_batching.priority_queue_policy", H, "a queue policy per level"),
    FieldRule("sequence_batching", H, "stateful models: the fields below"),
    FieldRule(
        "sequence_batching.direct",
        H,
        "max_queue_delay_microseconds, minimum_slot_utilization",
        whole=True,
    ),
    FieldRule("sequence_batching.oldest", H, "the fields below"),
    FieldRule("sequence_batching.oldest.max_candidate_sequences", H),
    FieldRule("sequence_batching.oldest.preferred_batch_size", H),
    FieldRule("sequence_batching.oldest.max_queue_delay_microseconds", H),
    FieldRule(
        "sequence_batching.oldest.preserve_ordering",
        R,
        "responses of the oldest strategy are not reordered",
        _true,
    ),
    FieldRule("sequence_batching.max_sequence_idle_microseconds", H),
    FieldRule(
        "sequence_batching.control_input",
        H,
        "START, END, READY, CORRID in their int32, fp32 and bool forms",
        whole=True,
    ),
    FieldRule("sequence_batching.state", H, "implicit state, kept by the server: the fields below"),
    FieldRule("sequence_batching.state.input_name", H),
    FieldRule("sequence_batching.state.output_name", H),
    FieldRule("sequence_batching.state.data_type", H),
    FieldRule("sequence_batching.state.dims", H),
    FieldRule("sequence_batching.state.initial_state", H, "zero_data or data_file", whole=True),
    FieldRule(
        "sequence_batching.state.use_same_buffer_for_input_output",
        W,
        "a GPU memory choice: no effect on what a client sees",
        _true,
    ),
    FieldRule(
        "sequence_batching.state.use_growable_memory",
        W,
        "a GPU memory choice: no effect on what a client sees",
        _true,
    ),
    FieldRule(
        "sequence_batching.iterative_sequence", R, "iterative sequences are not supported", _true
    ),
    FieldRule("ensemble_scheduling", H, "with platform ensemble: the fields below"),
    FieldRule("ensemble_scheduling.step", H, "the fields below"),
    FieldRule("ensemble_scheduling.step.model_name", H),
    FieldRule("ensemble_scheduling.step.model_version", H, "-1: the latest"),
    FieldRule("ensemble_scheduling.step.input_map", H),
    FieldRule("ensemble_scheduling.step.output_map", H),
    FieldRule(
        "ensemble_scheduling.step.model_namespace", R, "model namespaces are not supported", _true
    ),
    FieldRule(
        "ensemble_scheduling.max_inflight_requests",
        R,
        "newer than Triton 2.51: in-flight limits of ensembles are not supported",
        _true,
    ),
    FieldRule("instance_group", H, "the fields below"),
    FieldRule("instance_group.name", H),
    FieldRule(
        "instance_group.kind",
        R,
        "KIND_GPU needs a GPU on this machine and the pytorch backend; KIND_AUTO, KIND_CPU and "
        "KIND_MODEL run on the CPU",
        _gpu_kind,
    ),
    FieldRule("instance_group.count", H),
    FieldRule("instance_group.rate_limiter", R, "the rate limiter is not supported"),
    FieldRule(
        "instance_group.gpus",
        R,
        "GPU placement needs a GPU on this machine and the pytorch backend",
        _no_gpu_backend,
    ),
    FieldRule("instance_group.secondary_devices", R, "secondary devices are not supported"),
    FieldRule("instance_group.profile", W, "TensorRT optimization profiles: no effect here"),
    FieldRule("instance_group.passive", R, "passive instances are not supported", _true),
    FieldRule("instance_group.host_policy", W, "host policies have no effect here"),
    FieldRule("default_model_filename", H),
    FieldRule("cc_model_filenames", W, "per-GPU model files have no effect without a GPU"),
    FieldRule("metric_tags", W, "metric tags are not added to the metrics"),
    FieldRule(
        "parameters",
        W,
        "a parameter that the model's backend does not read (Python models get every parameter)",
        _unread_parameters,
    ),
    FieldRule(
        "model_warmup",
        H,
        "every instance runs the samples before it serves: zero_data, random_data, "
        "input_data_file (in the model's warmup/ folder)",
        whole=True,
    ),
    FieldRule(
        "model_operations",
        H,
        "every framework; paths resolve inside the model's folder; a .py file holds ONNX "
        "Runtime ops written in Python (onnxruntime-extensions' onnx_op), run in the model's "
        "worker",
        whole=True,
    ),
    FieldRule("model_transaction_policy", H, "decoupled models stream", whole=True),
    FieldRule("model_repository_agents", R, "repository agents are not supported"),
    FieldRule(
        "response_cache",
        H,
        "with the server's cache (--cache-config local,size=BYTES); not for decoupled models",
        whole=True,
    ),
    FieldRule("model_metrics", W, "histogram options have no effect: no histograms are kept"),
)

_BY_PATH = {rule.path: rule for rule in RULES}


def unread_parameters(config: ModelConfig) -> list[str]:
    """The config's parameters that neither the model's backend nor the server reads."""
    known = BACKEND_PARAMETERS.get(config.backend)
    if known is None:  # Python models (and unknown backends, refused elsewhere) get them all
        return []
    return sorted(k for k in config.parameters if k not in known and k not in SERVER_PARAMETERS)


def gpu_present() -> bool:
    """Whether an NVIDIA GPU is visible to this machine (without importing a framework)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


def check_fields(config: ModelConfig, gpu: bool | None = None) -> Findings:
    """The refused fields and broken rules (errors) and the ignored fields (warnings) of
    `config`."""
    context = RuleContext(config, gpu_present() if gpu is None else gpu)
    findings = Findings([], [])
    _walk(config, "", context, findings)
    if config.HasField("dynamic_batching"):
        findings.errors += priority_problems(config)
    return findings


def _walk(message: Message, prefix: str, context: RuleContext, findings: Findings) -> None:
    for descriptor, value in message.ListFields():
        path = prefix + descriptor.name
        rule = _BY_PATH.get(path)
        if rule is None:  # a gap in the table: refuse rather than serve without it
            findings.errors.append(f"config field '{path}' is not supported by opserve")
            continue
        if rule.verdict is Verdict.HONOURED:
            if descriptor.message_type is None or rule.whole or _is_map(descriptor):
                continue
            elements = [value] if isinstance(value, Message) else value
            for element in elements:
                _walk(element, path + ".", context, findings)
            continue
        if rule.applies is not None and not rule.applies(value, context):
            continue
        shown = _shown(path, value, context)
        if rule.verdict is Verdict.REFUSED:
            findings.errors.append(
                f"config field '{shown}' of model '{context.config.name}' is not supported by "
                f"opserve: {rule.note}"
            )
        else:
            findings.warnings.append(
                f"config field '{shown}' of model '{context.config.name}' is ignored: {rule.note}"
            )


def _is_map(descriptor: Any) -> bool:
    return descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry


def _shown(path: str, value: Any, context: RuleContext) -> str:
    """The field as the message names it (a kind's value, the parameters concerned)."""
    if path == "instance_group.kind":
        return f"{path}: {model_config_pb2.ModelInstanceGroup.Kind.Name(value)}"
    if path == "parameters":
        return f"parameters {{ {', '.join(unread_parameters(context.config))} }}"
    return path


def render_table() -> str:
    """The table as Markdown, for docs/config-fields.md."""
    lines = [
        "# Config fields: honoured, refused, ignored",
        "",
        "Generated from `opserve/config/support.py` (`python -m opserve.config.support > "
        "docs/config-fields.md`). A field set in `config.pbtxt` that is *refused* makes the "
        "model UNAVAILABLE naming the field; one that is *ignored* draws a warning in the log and "
        "in `opserve check`, and is ignored only where that cannot change an answer. A field's "
        "subfields follow its row unless they have rows of their own.",
        "",
        "| field | verdict | note |",
        "|---|---|---|",
    ]
    for rule in RULES:
        lines.append(f"| `{rule.path}` | {rule.verdict.value} | {rule.note} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_table())
