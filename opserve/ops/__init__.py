"""Custom-op libraries: where they are, and which ones a model gets."""

from opserve.ops.resolve import preloaded_libraries, resolve_model_libraries

__all__ = ["preloaded_libraries", "resolve_model_libraries"]
