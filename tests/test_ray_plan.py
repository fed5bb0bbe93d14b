"""What `opserve.ray` deploys for a repository, decided from the configs (no Ray cluster): the
replicas and resources of each model's deployment and the config its replicas load; the ASGI
call a replica answers with; the example Serve config against Serve's own schema."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from opserve.dataplane import DataPlane
from opserve.errors import InvalidArgumentError
from opserve.frontends.http import HttpApp
from opserve.ray.plan import plan_model, plan_repository
from opserve.ray.replica import call_http_app
from opserve.repository import ModelManager
from tests import models
from tests.conftest import EXAMPLES, ROOT

ONNX = 'backend: "onnxruntime"\nmax_batch_size: 4\n'


def write(repo: Path, name: str, config: str) -> Path:
    return models.write_model(repo, name, models.identity("FP32", [None, 4]), config)


def test_instance_count_becomes_replicas_of_one_instance(tmp_path: Path) -> None:
    folder = write(tmp_path, "m", ONNX + 'instance_group [ { name: "g" count: 3 kind: KIND_CPU } ]')
    plan = plan_model("m", folder)
    assert (plan.num_replicas, plan.num_gpus) == (3, 0.0)
    assert plan.replica_config is not None
    groups = list(plan.replica_config.instance_group)
    assert [(g.name, g.count, g.kind) for g in groups] == [("g", 1, 2)]  # 2: KIND_CPU
    assert plan.options() == {
        "name": "m",
        "num_replicas": 3,
        "ray_actor_options": {"num_cpus": 1},
    }


def test_groups_add_up_and_a_gpu_group_asks_ray_for_a_gpu(tmp_path: Path) -> None:
    config = ONNX + "instance_group [ { count: 1 kind: KIND_GPU }, { count: 2 kind: KIND_CPU } ]"
    plan = plan_model("m", write(tmp_path, "m", config))
    assert (plan.num_replicas, plan.num_gpus) == (3, 1.0)
    assert plan.options()["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 1.0}
    assert plan.replica_config is not None
    assert [g.kind for g in plan.replica_config.instance_group] == [1]  # KIND_GPU


def test_tritons_default_instances_where_the_config_gives_none(tmp_path: Path) -> None:
    # Triton: two CPU instances for onnxruntime, one for other backends
    assert plan_model("m", write(tmp_path, "m", ONNX)).num_replicas == 2
    python = tmp_path / "p"
    (python / "1").mkdir(parents=True)
    (python / "1" / "model.py").write_text("class TritonPythonModel:\n    pass\n")
    (python / "config.pbtxt").write_text('backend: "python"\n')
    assert plan_model("p", python).num_replicas == 1


def test_an_ensemble_is_one_replica_that_loads_its_own_config(tmp_path: Path) -> None:
    folder = tmp_path / "e"
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(
        'platform: "ensemble"\nensemble_scheduling { step [ { model_name: "m" '
        'model_version: -1 input_map { key: "INPUT0" value: "IN" } '
        'output_map { key: "OUTPUT0" value: "OUT" } } ] }\n'
    )
    plan = plan_model("e", folder)
    assert (plan.num_replicas, plan.replica_config) == (1, None)


def test_a_sequence_model_spread_over_replicas_is_refused(tmp_path: Path) -> None:
    config = ONNX + "sequence_batching { }\ninstance_group [ { count: 2 kind: KIND_CPU } ]"
    with pytest.raises(InvalidArgumentError, match="sequence_batching.*2 instances"):
        plan_model("m", write(tmp_path, "m", config))
    one = ONNX + "sequence_batching { }\ninstance_group [ { count: 1 kind: KIND_CPU } ]"
    assert plan_model("s", write(tmp_path, "s", one)).num_replicas == 1


def test_models_are_chosen_by_name_and_an_unknown_one_is_named(tmp_path: Path) -> None:
    write(tmp_path, "a", ONNX)
    write(tmp_path, "b", ONNX)
    assert [p.name for p in plan_repository(tmp_path)] == ["a", "b"]
    assert [p.name for p in plan_repository(tmp_path, ["b"])] == ["b"]
    with pytest.raises(InvalidArgumentError, match="no model 'c' in .*it holds 'a', 'b'"):
        plan_repository(tmp_path, ["c"])


def test_a_replica_answers_through_opservess_own_http_app(tmp_path: Path) -> None:
    """The replica's side of a forwarded request: opserve's app, its statuses and V2 errors."""

    async def scenario() -> list[tuple[int, bytes]]:
        dataplane = DataPlane(ModelManager([tmp_path]))
        app = HttpApp(dataplane)
        answers = []
        for method, path, body in (
            ("GET", "/v2/health/live", b""),
            ("GET", "/v2/models/absent", b""),
            ("POST", "/v2/models/absent/infer", b'{"inputs": []}'),
            ("GET", "/v2/models/absent/infer", b""),
        ):
            status, _, payload = await call_http_app(app, method, path, [], body)
            answers.append((status, payload))
        return answers

    live, metadata, infer, wrong_method = asyncio.run(scenario())
    assert live == (200, b"")
    unknown = {"error": "Request for unknown model: 'absent' is not found"}
    assert (metadata[0], orjson.loads(metadata[1])) == (404, unknown)
    assert (infer[0], orjson.loads(infer[1])) == (404, unknown)
    assert wrong_method[0] == 400


def test_the_example_serve_config_is_valid_for_serve() -> None:
    schema = pytest.importorskip("ray.serve.schema")
    yaml = pytest.importorskip("yaml")
    path = ROOT / "examples" / "ray" / "serve_config.yaml"
    config = schema.ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    (application,) = config.applications
    assert application.import_path == "opserve.ray:app"
    models_there = {p.name for p in plan_repository(EXAMPLES)}
    named = {d.name for d in application.deployments}
    assert named - models_there == {"opserve-ingress"}
