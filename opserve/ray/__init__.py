"""opserve on Ray Serve (the `opserve[ray]` extra): a model repository as a Serve application,
one deployment per model whose replicas host opserve's workers, behind a V2 HTTP ingress.

    serve run opserve.ray:app model_repository=/models

Ray is imported only when `app` is asked for (the planning modules work without it).
"""

from __future__ import annotations

from typing import Any

__all__ = ["app"]


def __getattr__(name: str) -> Any:
    if name != "app":
        raise AttributeError(f"module 'opserve.ray' has no attribute '{name}'")
    try:
        import ray.serve  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "opserve.ray needs Ray Serve: install the extra, pip install 'opserve[ray]'"
        ) from exc
    from opserve.ray.application import app

    return app
