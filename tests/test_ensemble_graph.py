"""The rules of an ensemble's graph (opserve.ensemble), table-driven, without a server."""

from __future__ import annotations

from pathlib import Path

import pytest

from opserve.config import normalize_platform, parse_model_config
from opserve.ensemble import build_graph, check_steps, downstream
from opserve.errors import InvalidArgumentError
from opserve.proto import ModelConfig


def config(text: str, name: str = "e") -> ModelConfig:
    parsed = parse_model_config(f'name: "{name}"\n{text}')
    return parsed


def step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> str:
    mapped = "".join(f' input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items())
    mapped += "".join(f' output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items())
    return f'{{ model_name: "{model}"{mapped} }}'


def ensemble(
    *steps: str, inputs=("X",), outputs=("Y",), extra: str = "", dims="4", scheduling: str = ""
) -> ModelConfig:
    io = "".join(f'input {{ name: "{n}" data_type: TYPE_FP32 dims: [ {dims} ] }}\n' for n in inputs)
    io += "".join(
        f'output {{ name: "{n}" data_type: TYPE_FP32 dims: [ {dims} ] }}\n' for n in outputs
    )
    return config(
        f'platform: "ensemble"\nmax_batch_size: 4\n{io}{extra}\n'
        f"ensemble_scheduling {{ {scheduling} step [ {', '.join(steps)} ] }}\n"
    )


def model(inputs: str = "X", outputs: str = "Y", extra: str = "", datatype="FP32", dims="4"):
    io = "".join(
        f'input {{ name: "{n}" data_type: TYPE_{datatype} dims: [ {dims} ] }}\n'
        for n in inputs.split()
    )
    io += "".join(
        f'output {{ name: "{n}" data_type: TYPE_{datatype} dims: [ {dims} ] }}\n'
        for n in outputs.split()
    )
    return config(f'backend: "python"\nmax_batch_size: 8\n{io}{extra}', "m")


# X -> a -> t; t -> b -> u; t -> c -> v; (u, v) -> d -> Y
DIAMOND = (
    step("a", {"X": "X"}, {"Y": "t"}),
    step("b", {"X": "t"}, {"Y": "u"}),
    step("c", {"X": "t"}, {"Y": "v"}),
    step("d", {"A": "u", "B": "v"}, {"Y": "Y"}),
)


def test_a_diamond_is_a_graph() -> None:
    graph = build_graph(ensemble(*DIAMOND))
    assert graph.model_names == ["a", "b", "c", "d"]
    assert graph.producers["u"].model_name == "b"
    assert [s.model_name for s in graph.consumers["t"]] == ["b", "c"]
    assert downstream(graph, graph.steps[0]) == {1, 2, 3}
    assert downstream(graph, graph.steps[1]) == {3}
    assert graph.cycle() is None


GRAPH_ERRORS = [
    ("no steps", ensemble(), "must specify 'step' for ensemble 'e'"),
    (
        "a step without a model",
        ensemble(step("", {"X": "X"}, {"Y": "Y"})),
        "must specify 'model_name' in step 0 of ensemble 'e'",
    ),
    (
        "a step without inputs",
        ensemble(step("a", {}, {"Y": "Y"})),
        "must specify 'input_map' in step 0 of ensemble 'e'",
    ),
    (
        "a step without outputs",
        ensemble(step("a", {"X": "X"}, {"Y": "Y"}), step("b", {"X": "X"}, {})),
        "must specify 'output_map' in step 1 of ensemble 'e'",
    ),
    (
        "a tensor written twice",
        ensemble(step("a", {"X": "X"}, {"Y": "Y"}), step("b", {"X": "X"}, {"Y": "Y"})),
        "ensemble tensor 'Y' can appear in an output map only once for ensemble 'e' step 1",
    ),
    (
        "an ensemble input nobody uses",
        ensemble(step("a", {"X": "X"}, {"Y": "Y"}), inputs=("X", "X2")),
        "ensemble input 'X2' for ensemble e' is not used",
    ),
    (
        "an ensemble output nobody writes",
        ensemble(step("a", {"X": "X"}, {"Y": "Y"}), outputs=("Y", "Z")),
        "ensemble output 'Z' for ensemble e' is not used",
    ),
    (
        "a step input nobody writes",
        ensemble(
            step("a", {"X": "X"}, {"Y": "t"}), step("b", {"A": "t", "B": "nobody"}, {"Y": "Y"})
        ),
        "output 'Y' for ensemble 'e' is not written: at least one of its depending tensors, "
        "'nobody', is not connected",
    ),
    (
        "a written tensor nobody reads",
        ensemble(step("a", {"X": "X"}, {"Y": "Y", "Z": "extra"})),
        "ensemble tensor 'extra' is unused in ensemble 'e'",
    ),
    (
        "a cycle",
        ensemble(
            step("m1", {"A": "X", "B": "loop"}, {"Y": "mid"}),
            step("m2", {"X": "mid"}, {"Y": "loop"}),
            step("m3", {"X": "mid"}, {"Y": "Y"}),
        ),
        "output 'Y' for ensemble 'e' is not written: at least one of its depending tensors, "
        "'loop', is not connected; its steps form a cycle: step 0 (model 'm1') -> "
        "step 1 (model 'm2') -> step 0 (model 'm1')",
    ),
    (
        "a model namespace",
        ensemble('{ model_name: "a" model_namespace: "n" }'),
        "'model_namespace' is not supported (step 0 of ensemble 'e')",
    ),
    (
        "a limit of requests in flight",
        ensemble(step("a", {"X": "X"}, {"Y": "Y"}), scheduling="max_inflight_requests: 2"),
        "'ensemble_scheduling.max_inflight_requests' is not supported (ensemble 'e')",
    ),
    (
        "an instance group",
        ensemble(step("a", {"X": "X"}, {"Y": "Y"}), extra="instance_group { count: 2 }"),
        "instance group should not be specified for ensemble 'e'",
    ),
    (
        "a backend",
        ensemble(step("a", {"X": "X"}, {"Y": "Y"}), extra='backend: "python"'),
        "Ensemble model 'e' must have platform type 'ensemble' and empty backend type",
    ),
    (
        "no dims",
        ensemble(step("a", {"X": "X"}, {"Y": "Y"}), dims=""),
        "model input 'X' must specify 'dims'",
    ),
    (
        "no scheduling",
        config('platform: "ensemble"\ninput { name: "X" data_type: TYPE_FP32 dims: [1] }'),
        "ensemble scheduling must be set for ensemble e whose platform is ensemble",
    ),
]


@pytest.mark.parametrize(
    ("ensemble_config", "message"),
    [pytest.param(c, m, id=i) for i, c, m in GRAPH_ERRORS],
)
def test_an_invalid_graph_is_refused_in_tritons_words(
    ensemble_config: ModelConfig, message: str
) -> None:
    with pytest.raises(InvalidArgumentError) as error:
        build_graph(ensemble_config)
    assert error.value.message == message


ONE_STEP = ensemble(step("m", {"X": "X"}, {"Y": "Y"}))

STEP_ERRORS = [
    (
        "a datatype disagreement",
        ONE_STEP,
        model(datatype="INT32"),
        "in ensemble e, ensemble tensor X: inconsistent data type: TYPE_FP32 is inferred from "
        "model e while TYPE_INT32 is inferred from model m",
    ),
    (
        "a shape disagreement",
        ONE_STEP,
        model(dims="3"),
        "in ensemble e, ensemble tensor X: inconsistent shape: [-1,4] is inferred from model e "
        "while [-1,3] is inferred from model m",
    ),
    (
        "an input the step model lacks",
        ensemble(step("m", {"NOPE": "X"}, {"Y": "Y"})),
        model(),
        "in ensemble e, ensemble tensor X is mapping to non-existing input NOPE in model m",
    ),
    (
        "a step input left unmapped",
        ONE_STEP,
        model(inputs="X B"),
        "in ensemble e, input B in model m is not mapped to any ensemble tensors",
    ),
    (
        "an output the step model lacks",
        ensemble(step("m", {"X": "X"}, {"NOPE": "Y"})),
        model(),
        "in ensemble e, ensemble tensor Y is mapped from non-existing output NOPE in model m",
    ),
    (
        "a smaller batch size",
        ONE_STEP,
        config(
            'backend: "python"\nmax_batch_size: 2\n'
            'input { name: "X" data_type: TYPE_FP32 dims: [4] }\n'
            'output { name: "Y" data_type: TYPE_FP32 dims: [4] }',
            "m",
        ),
        "ensemble e allows maximum batch size 4, but it contains model m which only allows "
        "maximum batch size to be 2",
    ),
]


@pytest.mark.parametrize(
    ("ensemble_config", "step_config", "message"),
    [pytest.param(e, s, m, id=i) for i, e, s, m in STEP_ERRORS],
)
def test_steps_that_disagree_with_their_models_are_refused(
    ensemble_config: ModelConfig, step_config: ModelConfig, message: str
) -> None:
    graph = build_graph(ensemble_config)
    with pytest.raises(InvalidArgumentError) as error:
        check_steps(ensemble_config, graph, {"m": step_config})
    assert error.value.message == message


def test_an_optional_input_may_stay_unmapped_and_auto_completed_sides_are_not_checked() -> None:
    optional = model(inputs="X")
    extra = optional.input.add()
    extra.CopyFrom(optional.input[0])
    extra.name, extra.optional = "B", True
    graph = build_graph(ONE_STEP)
    assert check_steps(ONE_STEP, graph, {"m": optional}) is False
    assert check_steps(ONE_STEP, graph, {"m": config('backend: "python"', "m")}) is False


def test_a_non_batching_step_fits_a_batching_ensemble_by_its_full_shape() -> None:
    step_config = config(
        'backend: "python"\nmax_batch_size: 0\n'
        'input { name: "X" data_type: TYPE_FP32 dims: [-1, 4] }\n'
        'output { name: "Y" data_type: TYPE_FP32 dims: [-1, 4] }',
        "m",
    )
    assert check_steps(ONE_STEP, build_graph(ONE_STEP), {"m": step_config}) is False


DECOUPLED = "model_transaction_policy { decoupled: true }"


def test_a_decoupled_step_makes_the_ensemble_decoupled() -> None:
    chain = ensemble(step("d", {"X": "X"}, {"Y": "t"}), step("m", {"X": "t"}, {"Y": "Y"}))
    configs = {"d": model(extra=DECOUPLED), "m": model()}
    assert check_steps(chain, build_graph(chain), configs) is True


def test_a_step_may_not_mix_responses_of_two_decoupled_models() -> None:
    mixed = ensemble(
        step("d1", {"X": "X"}, {"Y": "a"}),
        step("d2", {"X": "X"}, {"Y": "b"}),
        step("j", {"A": "a", "B": "b"}, {"Y": "Y"}),
    )
    configs = {"d1": model(extra=DECOUPLED), "d2": model(extra=DECOUPLED), "j": model("A B")}
    with pytest.raises(InvalidArgumentError) as error:
        check_steps(mixed, build_graph(mixed), configs)
    assert error.value.message == (
        "in ensemble e, step of model 'j' receives inputs originated from different decoupled "
        "models"
    )


def test_the_platform_is_ensemble_exactly_when_the_config_schedules_an_ensemble(
    tmp_path: Path,
) -> None:
    implied = config('ensemble_scheduling { step [ { model_name: "m" } ] }')
    normalize_platform(implied, tmp_path)
    assert (implied.platform, implied.backend) == ("ensemble", "")
    wrong = config('platform: "onnxruntime_onnx"\nensemble_scheduling { step [ ] }')
    with pytest.raises(InvalidArgumentError) as error:
        normalize_platform(wrong, tmp_path)
    assert error.value.message == (
        "ensemble scheduling cannot be set for model 'e' whose platform is not ensemble"
    )
