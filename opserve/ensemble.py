"""Ensembles (`platform: "ensemble"`): the graph of an `ensemble_scheduling` and its rules.

Pure functions, shared by the server (at load) and `opserve check` (offline). The wording of
the errors is Triton's (model_config_utils.cc `ValidateEnsembleSchedulingConfig`, ensemble_utils.cc
`ValidateEnsembleConfig`, model_repository_manager.cc for dependencies) where Triton has one.

An ensemble tensor is produced by exactly one step (or is an ensemble input) and consumed by
steps (or is an ensemble output): the steps form a DAG, and a step runs once all its inputs
exist.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

from opserve.errors import InvalidArgumentError
from opserve.proto import ModelConfig, model_config_pb2

ENSEMBLE_PLATFORM = "ensemble"


def is_ensemble(config: ModelConfig) -> bool:
    return config.platform == ENSEMBLE_PLATFORM


@dataclass(frozen=True)
class Step:
    index: int
    model_name: str
    model_version: int  # -1: the latest ready version
    input_map: Mapping[str, str]  # the step model's input -> ensemble tensor
    output_map: Mapping[str, str]  # the step model's output -> ensemble tensor

    @property
    def version(self) -> str:
        """The version as a request names it ("" for the latest)."""
        return "" if self.model_version < 0 else str(self.model_version)

    @property
    def label(self) -> str:
        return f"step {self.index} (model '{self.model_name}')"


@dataclass(frozen=True)
class EnsembleGraph:
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    steps: tuple[Step, ...]

    @cached_property
    def producers(self) -> dict[str, Step]:
        """Ensemble tensor -> the step that writes it."""
        return {tensor: s for s in self.steps for tensor in s.output_map.values()}

    @cached_property
    def consumers(self) -> dict[str, list[Step]]:
        found: dict[str, list[Step]] = {}
        for step in self.steps:
            for tensor in dict.fromkeys(step.input_map.values()):
                found.setdefault(tensor, []).append(step)
        return found

    @property
    def model_names(self) -> list[str]:
        return list(dict.fromkeys(s.model_name for s in self.steps))

    def cycle(self) -> list[Step] | None:
        """Steps that depend on themselves through their tensors, in order; None when the
        steps form a DAG."""
        state: dict[int, int] = {}  # 1: on the path, 2: done
        path: list[Step] = []

        def visit(step: Step) -> list[Step] | None:
            state[step.index] = 1
            path.append(step)
            for tensor in step.output_map.values():
                for after in self.consumers.get(tensor, []):
                    if state.get(after.index) == 1:
                        return path[path.index(after) :] + [after]
                    if after.index not in state:
                        found = visit(after)
                        if found is not None:
                            return found
            path.pop()
            state[step.index] = 2
            return None

        for step in self.steps:
            if step.index not in state:
                found = visit(step)
                if found is not None:
                    return found
        return None


def build_graph(config: ModelConfig) -> EnsembleGraph:
    """The graph of an ensemble's config, checked as Triton checks it before loading; an
    InvalidArgumentError (Triton's words) when it is not a valid ensemble."""
    name = config.name
    _check_ensemble_fields(config)
    steps = tuple(
        Step(i, s.model_name, s.model_version, dict(s.input_map), dict(s.output_map))
        for i, s in enumerate(config.ensemble_scheduling.step)
    )
    graph = EnsembleGraph(
        name, tuple(t.name for t in config.input), tuple(t.name for t in config.output), steps
    )
    for index, written_step in enumerate(config.ensemble_scheduling.step):
        if written_step.model_namespace:  # reserved by Triton for its own use
            raise InvalidArgumentError(
                f"'model_namespace' is not supported (step {index} of ensemble '{name}')"
            )
    written: set[str] = set()
    for step in steps:
        where = f"step {step.index} of ensemble '{name}'"
        if not step.model_name:
            raise InvalidArgumentError(f"must specify 'model_name' in {where}")
        if not step.input_map:
            raise InvalidArgumentError(f"must specify 'input_map' in {where}")
        if not step.output_map:
            raise InvalidArgumentError(f"must specify 'output_map' in {where}")
        for tensor in step.output_map.values():
            if tensor in written or list(step.output_map.values()).count(tensor) > 1:
                raise InvalidArgumentError(
                    f"ensemble tensor '{tensor}' can appear in an output map only once for "
                    f"ensemble '{name}' step {step.index}"
                )
            written.add(tensor)
    known = set(written) | {t for s in steps for t in s.input_map.values()}
    for tensor in graph.inputs:
        if tensor not in known:
            raise InvalidArgumentError(
                f"ensemble input '{tensor}' for ensemble {name}' is not used"
            )
    ready = _reachable(graph)
    for tensor in graph.outputs:
        if tensor not in known:
            raise InvalidArgumentError(
                f"ensemble output '{tensor}' for ensemble {name}' is not used"
            )
        if tensor not in ready:
            message = f"output '{tensor}' for ensemble '{name}' is not written"
            source = _unready_source(graph, tensor, ready)
            if source != tensor:
                message += f": at least one of its depending tensors, '{source}', is not connected"
            raise InvalidArgumentError(message + _cycle_note(graph))
    for tensor in sorted(known):
        if tensor in graph.outputs:
            continue
        if tensor not in ready or tensor not in graph.consumers:
            raise InvalidArgumentError(
                f"ensemble tensor '{tensor}' is unused in ensemble '{name}'" + _cycle_note(graph)
            )
    return graph


def _check_ensemble_fields(config: ModelConfig) -> None:
    name = config.name
    if not config.HasField("ensemble_scheduling"):
        raise InvalidArgumentError(
            f"ensemble scheduling must be set for ensemble {name} whose platform is "
            f"{ENSEMBLE_PLATFORM}"
        )
    if config.backend:
        raise InvalidArgumentError(
            f"Ensemble model '{name}' must have platform type '{ENSEMBLE_PLATFORM}' and empty "
            "backend type"
        )
    if len(config.instance_group):
        raise InvalidArgumentError(f"instance group should not be specified for ensemble '{name}'")
    if config.HasField("optimization"):
        raise InvalidArgumentError(f"optimization should not be specified for ensemble '{name}'")
    if len(config.model_warmup):
        raise InvalidArgumentError(f"model_warmup can not be specified for ensemble '{name}'")
    if config.ensemble_scheduling.max_inflight_requests:  # newer than Triton 2.51
        raise InvalidArgumentError(
            f"'ensemble_scheduling.max_inflight_requests' is not supported (ensemble '{name}')"
        )
    if not len(config.ensemble_scheduling.step):
        raise InvalidArgumentError(f"must specify 'step' for ensemble '{name}'")
    for kind, tensors in (("input", config.input), ("output", config.output)):
        for tensor in tensors:
            prefix = f"model {kind} '{tensor.name}' "
            if tensor.data_type == model_config_pb2.TYPE_INVALID:
                raise InvalidArgumentError(f"model {kind} must specify 'data_type'")
            if not len(tensor.dims):
                raise InvalidArgumentError(prefix + "must specify 'dims'")


def _reachable(graph: EnsembleGraph) -> set[str]:
    """Every tensor that can be written, starting from the ensemble inputs."""
    ready = set(graph.inputs)
    changed = True
    while changed:
        changed = False
        for step in graph.steps:
            if all(t in ready for t in step.input_map.values()):
                new = set(step.output_map.values()) - ready
                if new:
                    ready |= new
                    changed = True
    return ready


def _unready_source(graph: EnsembleGraph, tensor: str, ready: set[str]) -> str:
    """Following the unready inputs back from `tensor`: the first one no step writes (or the
    last one before the walk comes round a cycle)."""
    seen = {tensor}
    current = tensor
    while True:
        producer = graph.producers.get(current)
        if producer is None:
            return current
        following = next(
            (t for t in producer.input_map.values() if t not in ready and t not in seen), None
        )
        if following is None:
            return current
        seen.add(following)
        current = following


def _cycle_note(graph: EnsembleGraph) -> str:
    cycle = graph.cycle()
    if cycle is None:
        return ""
    return "; its steps form a cycle: " + " -> ".join(s.label for s in cycle)


def check_steps(
    config: ModelConfig, graph: EnsembleGraph, step_configs: Mapping[str, ModelConfig]
) -> bool:
    """Check each step against its model's config (Triton's `ValidateEnsembleConfig`): mapped
    tensors exist, every required input is mapped, producers and consumers agree on datatype
    and shape, batch sizes fit, and no step mixes the responses of two decoupled models.
    Returns whether the ensemble is decoupled (a step model is). A config that leaves its
    inputs (or outputs) to auto-complete is not checked on that side."""
    name = graph.name
    batching = config.max_batch_size > 0
    tensors: dict[str, _TensorFacts] = {}
    for tensor in [*config.input, *config.output]:
        dims = tuple(tensor.reshape.shape) if tensor.HasField("reshape") else tuple(tensor.dims)
        tensors[tensor.name] = _TensorFacts(name, batching, tensor.data_type, dims)
    for step in graph.steps:
        step_config = step_configs[step.model_name]
        if step_config.max_batch_size != 0 and step_config.max_batch_size < config.max_batch_size:
            raise InvalidArgumentError(
                f"ensemble {name} allows maximum batch size {config.max_batch_size}, but it "
                f"contains model {step.model_name} which only allows maximum batch size to be "
                f"{step_config.max_batch_size}"
            )
        _check_mapping(name, step, step_config, tensors)
    return _decoupled(graph, step_configs)


@dataclass(frozen=True)
class _TensorFacts:
    model: str
    batching: bool
    datatype: int
    dims: tuple[int, ...]

    @property
    def full_dims(self) -> tuple[int, ...]:
        return ((-1,) if self.batching else ()) + self.dims


def _dims_agree(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) and all(x == y or x == -1 or y == -1 for x, y in zip(a, b, strict=True))


def _consistent(name: str, tensor: str, known: _TensorFacts, new: _TensorFacts) -> None:
    prefix = f"in ensemble {name}, ensemble tensor {tensor}: "
    if known.datatype != new.datatype:
        type_name = model_config_pb2.DataType.Name
        raise InvalidArgumentError(
            prefix + f"inconsistent data type: {type_name(known.datatype)} is inferred from "
            f"model {known.model} while {type_name(new.datatype)} is inferred from model "
            f"{new.model}"
        )
    if not _dims_agree(known.dims, new.dims) and not _dims_agree(known.full_dims, new.full_dims):
        raise InvalidArgumentError(
            prefix + f"inconsistent shape: {_dims_text(known.full_dims)} is inferred from model "
            f"{known.model} while {_dims_text(new.full_dims)} is inferred from model {new.model}"
        )


def _dims_text(dims: tuple[int, ...]) -> str:
    return "[" + ",".join(map(str, dims)) + "]"


def _check_mapping(
    name: str, step: Step, step_config: ModelConfig, tensors: dict[str, _TensorFacts]
) -> None:
    model = step.model_name
    batching = step_config.max_batch_size > 0
    if len(step_config.input):
        inputs = {t.name: t for t in step_config.input}
        for model_input, tensor in step.input_map.items():
            if model_input not in inputs:
                raise InvalidArgumentError(
                    f"in ensemble {name}, ensemble tensor {tensor} is mapping to non-existing "
                    f"input {model_input} in model {model}"
                )
        for model_input, spec in inputs.items():
            if model_input not in step.input_map:
                if spec.optional:
                    continue
                raise InvalidArgumentError(
                    f"in ensemble {name}, input {model_input} in model {model} is not mapped "
                    "to any ensemble tensors"
                )
            tensor = step.input_map[model_input]
            facts = _TensorFacts(model, batching, spec.data_type, tuple(spec.dims))
            if tensor in tensors:
                _consistent(name, tensor, tensors[tensor], facts)
            else:
                tensors[tensor] = facts
    if len(step_config.output):
        outputs = {t.name: t for t in step_config.output}
        for model_output, tensor in step.output_map.items():
            spec = outputs.get(model_output)
            if spec is None:
                raise InvalidArgumentError(
                    f"in ensemble {name}, ensemble tensor {tensor} is mapped from "
                    f"non-existing output {model_output} in model {model}"
                )
            facts = _TensorFacts(model, batching, spec.data_type, tuple(spec.dims))
            if tensor in tensors:
                _consistent(name, tensor, tensors[tensor], facts)
            else:
                tensors[tensor] = facts


def _decoupled(graph: EnsembleGraph, step_configs: Mapping[str, ModelConfig]) -> bool:
    """Label each tensor with the decoupled step whose responses it follows (0: the request
    itself); a step, or the ensemble's outputs, may not mix two labels."""
    labels = {tensor: 0 for tensor in graph.inputs}
    next_label = 0
    pending = list(graph.steps)
    while pending:
        runnable = [s for s in pending if all(t in labels for t in s.input_map.values())]
        if not runnable:
            break  # unreachable after build_graph
        for step in runnable:
            pending.remove(step)
            found = {labels[t] for t in step.input_map.values()}
            if len(found) > 1:
                raise InvalidArgumentError(
                    f"in ensemble {graph.name}, step of model '{step.model_name}' receives "
                    "inputs originated from different decoupled models"
                )
            label = found.pop()
            if step_configs[step.model_name].model_transaction_policy.decoupled:
                next_label += 1
                label = next_label
            for tensor in step.output_map.values():
                labels[tensor] = label
    if len({labels.get(t, 0) for t in graph.outputs}) > 1:
        raise InvalidArgumentError(
            f"in ensemble {graph.name}, step of model '{graph.name}' receives inputs "
            "originated from different decoupled models"
        )
    return next_label > 0


def downstream(graph: EnsembleGraph, step: Step) -> frozenset[int]:
    """The steps that (transitively) consume what `step` writes."""
    found: set[int] = set()
    frontier = [step]
    while frontier:
        current = frontier.pop()
        for tensor in current.output_map.values():
            for after in graph.consumers.get(tensor, []):
                if after.index not in found:
                    found.add(after.index)
                    frontier.append(after)
    return frozenset(found)
