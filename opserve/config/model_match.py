"""Does a (completed) config agree with the model it describes? Pure; shared by the load and
`opserve check`, which gets the model's signature from a probe.

Every backend: a configured tensor the model does not have. ONNX Runtime models, as Triton's
onnxruntime backend checks them (its words): the datatype, and the dims (`reshape.shape` when
given) against the model's shape, with the batch dimension when `max_batch_size > 0`; inputs
compare loosely (a model's -1 takes any size), outputs exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from opserve.datatypes import config_to_v2
from opserve.errors import OpserveError
from opserve.proto import ModelConfig, model_config_pb2
from opserve.signature import ModelSignature, TensorSpec

# backends whose models Triton checks for datatypes and dims
_STRICT_BACKENDS = ("onnxruntime",)


def config_mismatches(config: ModelConfig, signature: ModelSignature) -> list[str]:
    """Each way the config contradicts the model, in Triton's words where Triton checks it."""
    problems = _unknown_names(config, signature)
    if problems or config.backend not in _STRICT_BACKENDS:
        return problems
    batch_outputs = {name for b in config.batch_output for name in b.target_name}
    for kind, tensors, specs in (
        ("input", config.input, signature.inputs),
        ("output", config.output, signature.outputs),
    ):
        by_name = {spec.name: spec for spec in specs}
        for tensor in tensors:
            spec = by_name.get(tensor.name)
            if spec is None:
                continue
            problem = _datatype_problem(config.name, kind, tensor, spec)
            if problem is None and tensor.name not in batch_outputs:
                if not (kind == "input" and tensor.allow_ragged_batch):
                    problem = _dims_problem(config, kind, tensor, spec.shape)
            if problem is not None:
                problems.append(problem)
    return problems


def _unknown_names(config: ModelConfig, signature: ModelSignature) -> list[str]:
    problems = []
    for kind, configured, actual in (
        ("input", config.input, signature.inputs),
        ("output", config.output, signature.outputs),
    ):
        names = {t.name for t in actual}
        for tensor in configured:
            if names and tensor.name not in names:
                problems.append(
                    f"unexpected {kind} '{tensor.name}' in the config of model '{config.name}'; "
                    f"the model has: {', '.join(sorted(names))}"
                )
    return problems


def _datatype_problem(model: str, kind: str, tensor, spec: TensorSpec) -> str | None:  # type: ignore[no-untyped-def]
    configured = model_config_pb2.DataType.Name(tensor.data_type)
    try:
        wanted = config_to_v2(configured)
    except OpserveError:
        return None  # refused elsewhere, with its own message
    if not spec.datatype or wanted == spec.datatype:
        return None
    return (
        f"unable to load model '{model}', configuration expects datatype {configured} for "
        f"{kind} '{tensor.name}', model provides TYPE_{spec.datatype}"
    )


def _dims_problem(config: ModelConfig, kind: str, tensor, model_shape: Sequence[int]) -> str | None:  # type: ignore[no-untyped-def]
    dims = list(tensor.reshape.shape) if tensor.HasField("reshape") else list(tensor.dims)
    if not model_shape:  # a scalar: every configured dim must be 1
        if all(d == 1 for d in dims):
            return None
        return (
            f"unable to load model '{config.name}', scalar tensor '{tensor.name}', should only "
            "provide 1 in the model configuration when the model doesn't support batching. "
            f"Model configuration provided: {shape_text(dims)}."
        )
    return compare_dims(
        config.name, tensor.name, list(model_shape), dims, config.max_batch_size, kind == "output"
    )


def compare_dims(
    model: str,
    tensor: str,
    model_shape: list[int],
    dims: list[int],
    max_batch_size: int,
    exact: bool,
) -> str | None:
    """Triton's CompareDimsSupported: None when the config's dims fit the model's shape."""
    prefix = f"model '{model}', tensor '{tensor}': "
    if max_batch_size > 0:
        if not model_shape or model_shape[0] != -1:
            return (
                f"{prefix}for the model to support batching the shape should have at least 1 "
                "dimension and the first dimension must be -1; but shape expected by the model "
                f"is {shape_text(model_shape)}"
            )
        full = [-1, *dims]
        if _fits(model_shape, full, exact):
            return None
        return (
            f"{prefix}the model expects {len(model_shape)} dimensions (shape "
            f"{shape_text(model_shape)}) but the model configuration specifies {len(full)} "
            "dimensions (an initial batch dimension because max_batch_size > 0 followed by the "
            f"explicit tensor shape, making complete shape {shape_text(full)})"
        )
    if _fits(model_shape, dims, exact):
        return None
    return (
        f"{prefix}the model expects {len(model_shape)} dimensions (shape "
        f"{shape_text(model_shape)}) but the model configuration specifies {len(dims)} "
        f"dimensions (shape {shape_text(dims)})"
    )


def _fits(model_shape: Sequence[int], dims: Sequence[int], exact: bool) -> bool:
    return len(model_shape) == len(dims) and all(
        m == d for m, d in zip(model_shape, dims, strict=True) if exact or m != -1
    )


def shape_text(shape: Iterable[int]) -> str:
    """Triton's ShapeToString: `[-1,4]`."""
    return "[" + ",".join(str(d) for d in shape) + "]"
