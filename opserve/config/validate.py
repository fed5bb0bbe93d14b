"""Triton's rules for a model config, with Triton's words, checked before the model is loaded.

Read from Triton 2.51's core, `src/model_config_utils.cc`: `ValidateModelConfig` (batch sizes,
the dynamic batcher's priorities and ordering, the sequence batcher's controls, ensembles, the
response cache), `ValidateModelIOConfig` (`ValidateIOShape`: names, data types, dims, reshape;
`ValidateBatchIO`) and `ValidateInstanceGroup` (kinds and GPUs). Its QA suite
(`qa/L0_model_config`) greps the server's log for these messages. What the model file itself says
(its tensors, whether it can batch) is checked once a worker has described it:
`check_against_signature`, with the words of Triton's onnxruntime backend (`src/onnxruntime.cc`,
`ValidateInputs` / `ValidateOutputs` / `AutoCompleteMaxBatch`, and the backend library's
`CompareDimsSupported`).

Pure functions: each raises `InvalidArgumentError` for the first broken rule, as Triton stops at
its first.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NoReturn

from opserve.config.normalize import normalize_instance_groups
from opserve.datatypes import v2_to_config
from opserve.ensemble import ENSEMBLE_PLATFORM
from opserve.errors import InvalidArgumentError
from opserve.proto import ModelConfig, model_config_pb2
from opserve.queues import priority_problems
from opserve.sequence_config import SequenceSettings
from opserve.signature import ModelSignature, TensorSpec

WILDCARD_DIM = -1
_Group = model_config_pb2.ModelInstanceGroup
_Input = model_config_pb2.ModelInput
_BatchInput = model_config_pb2.BatchInput
_BatchOutput = model_config_pb2.BatchOutput
_DELAY = model_config_pb2.ModelQueuePolicy.DELAY
# backends whose model files say their tensors (the checks against the model apply to them)
DESCRIBED_BACKENDS = frozenset({"onnxruntime"})
# a config read as written may name its platform only
_PLATFORM_BACKENDS = {"onnxruntime_onnx": "onnxruntime"}
GPU_BACKENDS = frozenset({"pytorch"})  # the backends this server runs on a GPU


def check_before_load(
    config: ModelConfig, auto_complete: bool = True, gpus: frozenset[int] = frozenset()
) -> None:
    """What the server checks before it looks at a model's files, in Triton's order: the
    config's own rules, its tensors (as far as auto-complete cannot change them), then its
    instance groups, normalized in place first (KIND_AUTO runs on a GPU only for a backend
    this server runs there: pytorch)."""
    validate_model(config)
    validate_io(config, io_complete=not auto_complete)
    if config.platform != ENSEMBLE_PLATFORM:
        usable = gpus if config.backend in GPU_BACKENDS else frozenset()
        normalize_instance_groups(config, usable)
        validate_instance_groups(config, gpus)


def validate_config(
    config: ModelConfig, io_complete: bool = True, gpus: frozenset[int] = frozenset()
) -> None:
    """Every rule of the config on its own. `io_complete` False: auto-complete may still fill
    the tensors' data types and dims (and, for lists left empty, the tensors), so only what it
    cannot change is checked. Instance groups are checked as normalized
    (`normalize_instance_groups`), with `gpus` the GPUs that exist."""
    validate_model(config)
    validate_io(config, io_complete)
    validate_instance_groups(config, gpus)


def validate_model(config: ModelConfig) -> None:
    """Triton's `ValidateModelConfig`: everything but the tensors and the instance groups."""
    name = config.name
    if config.max_batch_size < 0:
        _fail(f"'max_batch_size' must be non-negative value for {name}")
    if config.HasField("dynamic_batching"):
        _validate_dynamic_batching(config)
    if config.HasField("sequence_batching"):
        SequenceSettings.from_config(config)  # the controls and strategies, in Triton's words
    if config.HasField("ensemble_scheduling") and config.platform != ENSEMBLE_PLATFORM:
        _fail(
            f"ensemble scheduling cannot be set for model '{name}' whose platform is not "
            f"{ENSEMBLE_PLATFORM}"
        )
    if config.model_transaction_policy.decoupled and config.response_cache.enable:
        _fail(
            f"Response Cache does not currently support model {name} with 'decoupled' "
            "transaction policy. Please disable the response cache."
        )


def _validate_dynamic_batching(config: ModelConfig) -> None:
    name = config.name
    batching = config.dynamic_batching
    for size in batching.preferred_batch_size:
        if size <= 0:
            _fail(f"dynamic batching preferred size must be positive for {name}")
        if size > config.max_batch_size:
            _fail(f"dynamic batching preferred size must be <= max batch size for {name}")
    if batching.priority_levels:
        for problem in priority_problems(config):
            _fail(problem)
    if batching.preserve_ordering:
        if batching.priority_levels > 1:
            _fail(f"Only one priority level is allowed when 'preserve_ordering' is true for {name}")
        policies = [batching.default_queue_policy, *batching.priority_queue_policy.values()]
        if any(p.default_timeout_microseconds and p.timeout_action == _DELAY for p in policies):
            _fail(
                "Queue policy can not have DELAY as timeout action when 'preserve_ordering' "
                f"is true for {name}"
            )


def validate_io(config: ModelConfig, io_complete: bool = True) -> None:
    """Triton's `ValidateModelIOConfig`: each tensor's name, data type and shape, and the batch
    inputs and outputs; every message ends with "for <model>"."""
    try:
        for tensor in config.input:
            _validate_tensor(tensor, "model input ", config, io_complete)
            if tensor.format in (_Input.FORMAT_NHWC, _Input.FORMAT_NCHW) and (
                len(tensor.dims) != 3 and (io_complete or tensor.dims)
            ):
                _fail("model input NHWC/NCHW require 3 dims")
        for tensor in config.output:
            _validate_tensor(tensor, "model output ", config, io_complete)
        _validate_batch_io(config, io_complete)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"{exc.message} for {config.name}") from None
    if io_complete:
        for kind, tensors in (("input", config.input), ("output", config.output)):
            twice = _repeated(t.name for t in tensors)
            if twice:
                _fail(
                    f"model {kind} '{twice}' is specified more than once in the config of "
                    f"model '{config.name}'"
                )


def _validate_tensor(tensor, prefix: str, config: ModelConfig, io_complete: bool) -> None:  # type: ignore[no-untyped-def]
    """Triton's `ValidateIOShape` (and its checks for TensorRT-only fields)."""
    if not tensor.name:
        _fail(prefix + "must specify 'name'")
    prefix += f"'{tensor.name}' "
    if io_complete and tensor.data_type == model_config_pb2.TYPE_INVALID:
        _fail(prefix + "must specify 'data_type'")
    if io_complete and not tensor.dims:
        _fail(prefix + "must specify 'dims'")
    reshape = list(tensor.reshape.shape) if tensor.HasField("reshape") else None
    if reshape == [] and config.max_batch_size == 0:
        _fail(
            prefix + "cannot have empty reshape for non-batching model as scalar tensors are "
            "not supported"
        )
    if any(d < 1 and d != WILDCARD_DIM for d in tensor.dims):
        _fail(
            prefix + "dimension must be integer >= 1, or -1 to indicate a variable-size dimension"
        )
    if reshape is not None and (tensor.dims or io_complete):
        _validate_reshape(list(tensor.dims), reshape, prefix)
    if tensor.is_shape_tensor:
        _fail("shape tensors are only supported for TensorRT platform")
    if tensor.is_non_linear_format_io:
        _fail("Non-linear IO format is only supported for the TensorRT platform")


def _validate_reshape(dims: list[int], reshape: list[int], prefix: str) -> None:
    if any(d < 1 and d != WILDCARD_DIM for d in reshape):
        _fail(
            prefix + "reshape dimensions must be integer >= 1, or -1 to indicate a "
            "variable-size dimension"
        )
    dims_size, reshape_size = element_count(dims), element_count(reshape)
    # an empty reshape (a scalar) stands for dims of one element
    if dims_size != reshape_size and (reshape_size != 0 or dims_size != 1):
        _fail(prefix + "has different size for dims and reshape")
    if dims_size == WILDCARD_DIM:  # the stretches between variable dimensions must agree
        dims_runs, reshape_runs = _runs(dims), _runs(reshape)
        if len(dims_runs) != len(reshape_runs):
            _fail(prefix + "has different number of variable-size dimensions for dims and reshape")
        if dims_runs != reshape_runs:
            _fail(prefix + "has different size for dims and reshape")


def element_count(dims: Sequence[int]) -> int:
    """Triton's `GetElementCount`: -1 when a dimension is variable, 0 for no dimensions."""
    if WILDCARD_DIM in dims:
        return WILDCARD_DIM
    count = 0
    for index, dim in enumerate(dims):
        count = dim if index == 0 else count * dim
    return count


def _runs(dims: list[int]) -> list[int]:
    """The element counts of the stretches between variable-size dimensions."""
    runs, current = [], 1
    for dim in dims:
        if dim == WILDCARD_DIM:
            runs.append(current)
            current = 1
        else:
            current *= dim
    return [*runs, current]


def _validate_batch_io(config: ModelConfig, io_complete: bool) -> None:
    """Triton's `ValidateBatchIO`. Source and target names are checked only against tensor
    lists that auto-complete will not fill."""
    inputs = {t.name for t in config.input}
    outputs = {t.name for t in config.output}
    names_known = io_complete or (bool(inputs) and bool(outputs))
    for batch_input in config.batch_input:
        kind = _BatchInput.Kind.Name(batch_input.kind)
        if len(batch_input.source_input) != 1:
            _fail(
                f"batch input kind '{kind}' expects 1 source input, got "
                f"{len(batch_input.source_input)}"
            )
        if batch_input.data_type not in (model_config_pb2.TYPE_INT32, model_config_pb2.TYPE_FP32):
            _fail("batch input data type must be TYPE_INT32 or TYPE_FP32")
        for source in batch_input.source_input:
            if names_known and source not in inputs:
                _fail(f"unknown source input name '{source}'")
    for batch_output in config.batch_output:
        kind = _BatchOutput.Kind.Name(batch_output.kind)
        if len(batch_output.source_input) != 1:
            _fail(
                f"batch output kind '{kind}' expects 1 source input, got "
                f"{len(batch_output.source_input)}"
            )
        for source in batch_output.source_input:
            if names_known and source not in inputs:
                _fail(f"unknown source input name '{source}'")
        targets: set[str] = set()
        for target in batch_output.target_name:
            if names_known and target not in outputs:
                _fail(f"unknown target output name '{target}'")
            if target in targets:
                _fail(f"target output name '{target}' can only be specified once")
            targets.add(target)


def validate_instance_groups(config: ModelConfig, gpus: frozenset[int] = frozenset()) -> None:
    """Triton's `ValidateInstanceGroup` for a config whose groups are normalized."""
    if config.HasField("ensemble_scheduling"):
        return
    name = config.name
    if not config.instance_group:
        _fail(f"must specify one or more 'instance group's for {name}")
    for group in config.instance_group:
        where = f"instance group {group.name} of model {name}"
        if group.kind == _Group.KIND_MODEL and group.gpus:
            _fail(f"{where} has kind KIND_MODEL but specifies one or more GPUs")
        elif group.kind == _Group.KIND_GPU:
            if not group.gpus:
                _fail(
                    f"{where} has kind KIND_GPU but "
                    + ("specifies no GPUs" if gpus else "no GPUs are available")
                )
            for gpu in group.gpus:
                if gpu not in gpus:
                    _fail(
                        f"{where} specifies invalid or unsupported gpu id {gpu}. GPUs with at "
                        "least the minimum required CUDA compute compatibility of 6.000000 are: "
                        + ", ".join(str(g) for g in sorted(gpus))
                    )
        elif group.kind == _Group.KIND_CPU and group.gpus:
            _fail(f"{where} has kind KIND_CPU but specifies one or more GPUs")
        if group.profile:
            _fail(
                f"{where} and platform {config.platform}specifies profile field which is only "
                "supported for TensorRT models"
            )


def check_against_signature(
    config: ModelConfig, signature: ModelSignature, autocompleted: bool
) -> None:
    """`model_mismatches`, raised: the load refuses a config that contradicts its model."""
    problems = model_mismatches(config, signature, autocompleted)
    if problems:
        _fail("; ".join(problems))


def model_mismatches(
    config: ModelConfig, signature: ModelSignature, autocompleted: bool = False
) -> list[str]:
    """Each way the config contradicts what the model file says, in Triton's words; shared by
    the load and `opserve check` (which has the signature from a probe). ONNX Runtime models as
    Triton's onnxruntime backend checks them: whether the model can batch (when auto-complete
    ran), how many inputs it has, and each configured tensor's name, data type and shape. Other
    backends: the configured tensors' names. `autocompleted`: the backend's auto-complete ran
    (the config left its inputs or outputs to it)."""
    name = config.name
    backend = config.backend or _PLATFORM_BACKENDS.get(config.platform, "")
    if backend not in DESCRIBED_BACKENDS:
        return _unknown_tensors(config, signature)
    if autocompleted and config.max_batch_size != 0 and not signature.supports_batching():
        return [
            f"autofill failed for model '{name}': model does not support batching while "
            "non-zero max_batch_size is specified"
        ]
    required = [t for t in signature.inputs if not t.optional]
    expected = len(config.input) + len(config.batch_input) + _sequence_input_count(config)
    # an input the model may go without (an overridable initializer) may be listed or not
    if not len(required) <= expected <= len(signature.inputs):
        provides = len(required) if expected < len(required) else len(signature.inputs)
        return [
            f"unable to load model '{name}', configuration expects {expected} inputs, model "
            f"provides {provides}"
        ]
    problems = _unknown_tensors(config, signature, every=True)
    for kind, configured, actual in (
        ("input", config.input, signature.inputs),
        ("output", config.output, signature.outputs),
    ):
        by_name = {t.name: t for t in actual}
        for tensor in configured:
            spec = by_name.get(tensor.name)
            if spec is not None:
                try:
                    _check_tensor(config, kind, tensor, spec)
                except InvalidArgumentError as exc:
                    problems.append(exc.message)
    return problems


def _unknown_tensors(
    config: ModelConfig, signature: ModelSignature, every: bool = False
) -> list[str]:
    """Configured tensors the model does not have (checked only where the model names any,
    unless `every`)."""
    problems = []
    for kind, configured, actual in (
        ("input", config.input, signature.inputs),
        ("output", config.output, signature.outputs),
    ):
        names = sorted(t.name for t in actual)
        for tensor in configured:
            if (names or every) and tensor.name not in names:
                problems.append(
                    f"unexpected inference {kind} '{tensor.name}', allowed {kind}s are: "
                    + ", ".join(names)
                )
    return problems


def _sequence_input_count(config: ModelConfig) -> int:
    """The control and state inputs the sequence batcher adds (one per control kind given)."""
    batcher = config.sequence_batching
    kinds = {c.kind for control in batcher.control_input for c in control.control}
    return len(kinds) + len(batcher.state)


def _check_tensor(config: ModelConfig, kind: str, tensor, spec: TensorSpec) -> None:  # type: ignore[no-untyped-def]
    name = config.name
    if kind == "input" and tensor.optional and config.max_batch_size != 0:
        _fail(
            f"unable to load model '{name}', optional input '{tensor.name}' is not supported "
            "for models that support batching"
        )
    configured_type = model_config_pb2.DataType.Name(tensor.data_type)
    if spec.datatype and configured_type != v2_to_config(spec.datatype):
        _fail(
            f"unable to load model '{name}', configuration expects datatype {configured_type} "
            f"for {kind} '{tensor.name}', model provides TYPE_{spec.datatype}"
        )
    dims = list(tensor.reshape.shape) if tensor.HasField("reshape") else list(tensor.dims)
    if spec.shape:
        compare_dims(name, tensor.name, spec.shape, dims, config.max_batch_size, kind == "output")
    elif any(d != 1 for d in dims):
        _fail(
            f"unable to load model '{name}', scalar tensor '{tensor.name}', should only provide "
            "1 in the model configuration when the model doesn't support batching. Model "
            f"configuration provided: {_shape(dims)}."
        )


def compare_dims(
    model: str,
    tensor: str,
    model_shape: Sequence[int],
    dims: Sequence[int],
    max_batch_size: int,
    exact: bool,
) -> None:
    """Triton's `CompareDimsSupported`: the config's shape (with the batch dimension when
    `max_batch_size` > 0) against the model's; a variable model dimension matches anything
    unless `exact` (outputs)."""
    prefix = f"model '{model}', tensor '{tensor}': "
    full = list(dims)
    if max_batch_size > 0:
        if not model_shape or model_shape[0] != WILDCARD_DIM:
            _fail(
                prefix + "for the model to support batching the shape should have at least 1 "
                "dimension and the first dimension must be -1; but shape expected by the model "
                f"is {_shape(model_shape)}"
            )
        full = [WILDCARD_DIM, *dims]
    agree = len(model_shape) == len(full) and all(
        m == d for m, d in zip(model_shape, full, strict=False) if exact or m != WILDCARD_DIM
    )
    if agree:
        return
    if max_batch_size > 0:
        given = (
            f"{len(full)} dimensions (an initial batch dimension because max_batch_size > 0 "
            f"followed by the explicit tensor shape, making complete shape {_shape(full)})"
        )
    else:
        given = f"{len(full)} dimensions (shape {_shape(full)})"
    _fail(
        prefix + f"the model expects {len(model_shape)} dimensions (shape "
        f"{_shape(model_shape)}) but the model configuration specifies {given}"
    )


def _shape(dims: Iterable[int]) -> str:
    return "[" + ",".join(str(d) for d in dims) + "]"


def _repeated(names: Iterable[str]) -> str | None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return None


def _fail(message: str) -> NoReturn:
    raise InvalidArgumentError(message)
