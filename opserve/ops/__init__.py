"""Custom-op libraries: where they are, and which ones a model gets.

The names below are imported on first use: `python -m opserve.ops.probe` runs under a model's
own environment, which has the standard library and its framework, not pyelftools or protobuf.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BACKEND_FRAMEWORKS": "opserve.ops.frameworks",
    "framework_library_dir": "opserve.ops.frameworks",
    "library_framework": "opserve.ops.frameworks",
    "PRELOAD_HANDOFF": "opserve.ops.resolve",
    "preloaded_libraries": "opserve.ops.resolve",
    "resolve_model_libraries": "opserve.ops.resolve",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'opserve.ops' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
