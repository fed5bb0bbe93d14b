"""Custom-op libraries: where they are, and which ones a model gets."""

from opserve.ops.frameworks import BACKEND_FRAMEWORKS, framework_library_dir, library_framework
from opserve.ops.resolve import PRELOAD_HANDOFF, preloaded_libraries, resolve_model_libraries

__all__ = [
    "BACKEND_FRAMEWORKS",
    "PRELOAD_HANDOFF",
    "framework_library_dir",
    "library_framework",
    "preloaded_libraries",
    "resolve_model_libraries",
]
