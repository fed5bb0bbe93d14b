"""ONNX Runtime ops written in Python, with onnxruntime-extensions' `onnx_op` decorator.

A model names its Python op file as it names a shared library:
`model_operations { op_library_filename: "my_ops.py" }`. Its worker runs the file (the
decorators register the ops with onnxruntime-extensions' library, in that process only) and then
registers that library with the session, which serves the file's ops in the domain
`ai.onnx.contrib`. Runs only in a worker or a probe, never in the server.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

EXTENSIONS_MISSING = (
    "Python ops (a model_operations file ending in .py) need onnxruntime-extensions: "
    "pip install onnxruntime-extensions"
)


def is_python_ops(path: Path) -> bool:
    return path.suffix == ".py"


def load_python_ops(path: Path) -> Path:
    """Run the op file once in this process; returns the onnxruntime-extensions library that
    serves its ops (to register with ONNX Runtime after every op file has run)."""
    try:
        from onnxruntime_extensions import get_library_path
    except ImportError as exc:
        raise ImportError(f"{EXTENSIONS_MISSING} ({exc})") from exc
    name = "opserve_python_ops_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import '{path}'")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return Path(get_library_path())
