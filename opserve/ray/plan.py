"""What Ray Serve deploys for a model repository, decided from the models' configs alone (no Ray,
no framework): one deployment per model, its default replicas and resources from the model's
`instance_group`, and the config each replica loads (one instance per replica)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opserve.config.model import model_config_for
from opserve.config.normalize import normalize_instance_groups
from opserve.ensemble import is_ensemble
from opserve.errors import InvalidArgumentError
from opserve.proto import ModelConfig, model_config_pb2
from opserve.repository.layout import find_models

_Group = model_config_pb2.ModelInstanceGroup

# The ingress's deployment name; model deployments are named after their models.
INGRESS_NAME = "opserve-ingress"


@dataclass(frozen=True)
class ModelPlan:
    """One model's deployment. `replica_config`: the config every replica loads in place of
    `config.pbtxt` (its instance groups reduced to one instance: Serve's replicas are the
    instances); None loads the folder's own (ensembles, whose steps load with them)."""

    name: str
    num_replicas: int
    num_gpus: float
    replica_config: ModelConfig | None

    def options(self, num_cpus: float = 1.0) -> dict[str, Any]:
        """Serve's deployment options for this model (`num_cpus`: what Ray reserves for each
        replica); a Serve config file's `deployments` entry of the same name overrides any."""
        actor: dict[str, Any] = {"num_cpus": num_cpus}
        if self.num_gpus:
            actor["num_gpus"] = self.num_gpus
        return {
            "name": self.name,
            "num_replicas": self.num_replicas,
            "ray_actor_options": actor,
        }


def plan_repository(repository: Path, models: Iterable[str] | None = None) -> list[ModelPlan]:
    """A plan for every model of `repository`, or for those named in `models` (an unknown
    name is an error naming the models there are)."""
    folders = find_models([repository])
    names = sorted(folders) if models is None else list(models)
    unknown = [n for n in names if n not in folders]
    if unknown:
        raise InvalidArgumentError(
            f"no model {', '.join(repr(n) for n in unknown)} in {repository}; it holds "
            f"{', '.join(repr(n) for n in sorted(folders)) or 'no models'}"
        )
    if not names:
        raise InvalidArgumentError(f"the model repository {repository} holds no models")
    return [plan_model(name, folders[name]) for name in names]


def plan_model(name: str, folder: Path) -> ModelPlan:
    """Replicas: the instances the config asks for (`count` summed over its groups, Triton's
    default where it gives none); one GPU per replica when a group is KIND_GPU. A model with
    `sequence_batching` keeps one replica: a sequence's requests must all reach the replica
    that holds its state, and Serve routes each request on its own."""
    config = model_config_for(name, folder)
    if is_ensemble(config):
        return ModelPlan(name, 1, 0.0, None)
    on_gpu = any(group.kind == _Group.KIND_GPU for group in config.instance_group)
    counted = ModelConfig()
    counted.CopyFrom(config)
    normalize_instance_groups(counted, frozenset())  # KIND_AUTO: the CPU, as on a GPU-less host
    replicas = sum(group.count for group in counted.instance_group) or 1
    if config.HasField("sequence_batching") and replicas > 1:
        raise InvalidArgumentError(
            f"model '{name}' uses sequence_batching and asks for {replicas} instances: through "
            "Ray Serve each instance is a replica, and a sequence's requests would be spread "
            "over them; give it one instance (instance_group count: 1)"
        )
    replica = ModelConfig()
    replica.CopyFrom(config)
    del replica.instance_group[:]
    first = config.instance_group[0] if config.instance_group else None
    group = replica.instance_group.add(name=first.name if first is not None else "", count=1)
    # a GPU replica sees the one GPU Ray gave it; otherwise the group's own kind (AUTO: the
    # replica decides from the GPUs it sees, as Triton does)
    group.kind = _Group.KIND_GPU if on_gpu else first.kind if first is not None else 0
    return ModelPlan(name, replicas, 1.0 if on_gpu else 0.0, replica)
