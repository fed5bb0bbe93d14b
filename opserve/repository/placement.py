"""Where a model's instances run: worker processes of their own, or slots of a shared worker
(pure rules, no processes).

With `--shared-workers`, the instances of a model share one worker process per framework backend
(the key) with the other models of that backend, unless something about the model could reach
beyond its own instances:

- its backend is not a framework's (`python`: `model.py` may do anything, as in Triton, where
  each Python model has a stub process of its own);
- it brings op libraries (`model_operations`, `OP_LIBRARY_SOURCES`): libraries of two models may
  register the same op, and a library unloads only with its process;
- op libraries apply to it from outside (`--op-library` or `LD_PRELOAD` libraries of its
  framework): each model's backend would load them again into the same process;
- it has an environment of its own (`EXECUTION_ENV_PATH`): another interpreter;
- it has GPU instances (a CUDA context and GPU memory per process stay with the model);
- its parameter `SHARED_WORKER` is "false" (the operator's opt-out).

Everything else shares: its instances run in order each, different instances at once (see
`workers/main.py`); a crash of the shared process restarts every model it held.
"""

from __future__ import annotations

from dataclasses import dataclass

from opserve.errors import InvalidArgumentError
from opserve.ops.resolve import SOURCES_PARAMETER
from opserve.proto import ModelConfig

SHARED_BACKENDS = frozenset({"onnxruntime", "pytorch", "tensorflow"})
OPT_OUT_PARAMETER = "SHARED_WORKER"
ENV_PARAMETER = "EXECUTION_ENV_PATH"
_KIND_GPU = 1  # ModelInstanceGroup.KIND_GPU
_KIND_AUTO = 0


@dataclass(frozen=True)
class Placement:
    shared: str | None  # the shared worker's key (the backend); None: processes of its own
    reason: str  # why not shared ("" when shared)


def place(
    config: ModelConfig,
    sharing: bool,
    outside_libraries: bool = False,
    gpus: frozenset[int] = frozenset(),
) -> Placement:
    """The placement of a model's instances. `sharing`: the server's `--shared-workers`;
    `outside_libraries`: server-wide or preloaded op libraries of the model's framework exist."""
    opt_in = _opt_in(config)
    if not sharing:
        return Placement(None, "worker sharing is off (--shared-workers)")
    if not opt_in:
        return Placement(None, f'its parameter {OPT_OUT_PARAMETER} is "false"')
    backend = config.backend
    if backend not in SHARED_BACKENDS:
        return Placement(None, f"backend '{backend}' keeps a process per instance")
    if ENV_PARAMETER in config.parameters:
        return Placement(None, f"it has an execution environment of its own ({ENV_PARAMETER})")
    if config.model_operations.op_library_filename:
        return Placement(None, "it brings op libraries of its own (model_operations)")
    if SOURCES_PARAMETER in config.parameters:
        return Placement(None, f"it brings op libraries of its own ({SOURCES_PARAMETER})")
    if outside_libraries:
        return Placement(None, "server-wide or preloaded op libraries of its framework apply to it")
    for group in config.instance_group:
        on_gpu = group.kind == _KIND_GPU or (
            group.kind == _KIND_AUTO and backend == "pytorch" and bool(gpus)
        )
        if on_gpu:
            return Placement(None, "it has GPU instances")
    return Placement(backend, "")


def _opt_in(config: ModelConfig) -> bool:
    """The model's `SHARED_WORKER` parameter: "true" (the default) or "false"."""
    parameter = config.parameters.get(OPT_OUT_PARAMETER)
    if parameter is None:
        return True
    text = parameter.string_value.strip().lower()
    if text not in ("true", "false"):
        raise InvalidArgumentError(
            f'model \'{config.name}\': parameter {OPT_OUT_PARAMETER} must be "true" or "false" '
            f"(a worker process of its own), not {parameter.string_value!r}"
        )
    return text == "true"
