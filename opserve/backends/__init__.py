"""Backends: one module per framework behind the small interface in `base`.

Modules are imported lazily, inside a worker process, so that the server never imports a
framework. A missing framework is an UNAVAILABLE model whose message names the extra to install.
"""

from __future__ import annotations

import importlib

from opserve.backends.base import Backend, BackendContext, Description, Reply, Request
from opserve.errors import UnavailableError, UnsupportedError

# backend name -> (module, class, the pip extra that provides its framework)
_BACKENDS: dict[str, tuple[str, str, str]] = {
    "onnxruntime": ("opserve.backends.onnxruntime", "OnnxRuntimeBackend", "onnxruntime"),
    "pytorch": ("opserve.backends.pytorch", "PyTorchBackend", "pytorch"),
    "tensorflow": ("opserve.backends.tensorflow", "TensorFlowBackend", "tensorflow"),
    "python": ("opserve.backends.python", "PythonBackend", ""),
}


def backend_class(name: str) -> type[Backend]:
    try:
        module_name, class_name, extra = _BACKENDS[name]
    except KeyError:
        raise UnsupportedError(f"backend '{name}' is not supported by this server") from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnavailableError(
            f"backend '{name}' needs its framework, which is not installed ({exc}); "
            f"install it with: pip install 'opserve[{extra}]'"
        ) from exc
    return getattr(module, class_name)


__all__ = ["Backend", "BackendContext", "Description", "Reply", "Request", "backend_class"]
