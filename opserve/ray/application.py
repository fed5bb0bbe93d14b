"""The Serve application of a model repository: `serve run opserve.ray:app model_repository=DIR`
(Serve's application builder), or `app({...})` from Python."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from opserve.errors import OpserveError
from opserve.ray.ingress import V2Ingress
from opserve.ray.plan import INGRESS_NAME, plan_repository
from opserve.ray.replica import ModelReplica

# Requests a replica takes at once before Serve routes elsewhere or queues: opserve's scheduler
# keeps a few in flight per instance and queues the rest, so a replica takes more than Serve's
# default of 5; the ingress only forwards.
MODEL_MAX_ONGOING = 32
INGRESS_MAX_ONGOING = 256


def app(args: dict[str, Any]) -> Any:
    """Build the application. `args`: `model_repository` (a folder every node sees), optionally
    `models` (names, a list or comma-separated: the default is every model), `num_cpus` (the
    CPUs Ray reserves for each model replica, 1 by default: less fits more replicas on a small
    machine) and, from Python,
    `options` (deployment name -> Serve deployment options over the defaults, as a Serve config
    file's `deployments` entries give them: a model's name, or the ingress's)."""
    from ray import serve

    repository = args.get("model_repository")
    if not repository:
        raise ValueError("opserve.ray:app needs model_repository=DIR (a Triton model repository)")
    models = args.get("models")
    if isinstance(models, str):
        models = [m.strip() for m in models.split(",") if m.strip()]
    try:
        num_cpus = float(args.get("num_cpus", 1.0))
    except ValueError:
        raise ValueError(f"num_cpus must be a number, not {args['num_cpus']!r}") from None
    overrides: Mapping[str, Mapping[str, Any]] = args.get("options") or {}
    folder = Path(repository).resolve()
    try:
        plans = plan_repository(folder, models)
    except OpserveError as exc:
        raise ValueError(exc.message) from None
    if any(p.name == INGRESS_NAME for p in plans):
        raise ValueError(f"a model named '{INGRESS_NAME}' would take the ingress's name")
    unknown = sorted(set(overrides) - {p.name for p in plans} - {INGRESS_NAME})
    if unknown:
        raise ValueError(f"options name no deployment of the application: {', '.join(unknown)}")
    # (Serve's overloads type a decorated class as a decorator factory: Any here)
    replica: Any = serve.deployment(ModelReplica)
    handles = {}
    for plan in plans:
        options = {"max_ongoing_requests": MODEL_MAX_ONGOING, **plan.options(num_cpus)}
        options.update(overrides.get(plan.name, {}))
        config = plan.replica_config
        handles[plan.name] = replica.options(**options).bind(
            str(folder), plan.name, None if config is None else config.SerializeToString()
        )
    router: Any = serve.deployment(V2Ingress)
    ingress = router.options(
        **{
            "name": INGRESS_NAME,
            "max_ongoing_requests": INGRESS_MAX_ONGOING,
            "ray_actor_options": {"num_cpus": 0},
            **overrides.get(INGRESS_NAME, {}),
        }
    )
    return ingress.bind(handles)
