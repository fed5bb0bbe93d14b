"""Which framework a custom-op library is built for, told from its ELF facts alone."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path

from opserve.ops.elf import read_elf

ONNXRUNTIME = "onnxruntime"
PYTORCH = "pytorch"
TENSORFLOW = "tensorflow"
PYTHON_OPS_SUFFIX = ".py"  # an op "library" of ONNX Runtime ops written in Python

# backend name -> the framework whose op libraries it loads
BACKEND_FRAMEWORKS = {"onnxruntime": ONNXRUNTIME, "pytorch": PYTORCH, "tensorflow": TENSORFLOW}

# the Python package that carries each framework's shared libraries, and where they are in it
_PACKAGE_LIB_DIRS = {
    PYTORCH: ("torch", "lib"),
    TENSORFLOW: ("tensorflow", ""),
    ONNXRUNTIME: ("onnxruntime", "capi"),
}


def library_framework(path: Path) -> str | None:
    """`pytorch`, `tensorflow` or `onnxruntime`; None when the library shows no framework.
    A Python file holds ONNX Runtime ops written with onnxruntime-extensions' `onnx_op`."""
    if path.suffix == PYTHON_OPS_SUFFIX:
        return ONNXRUNTIME
    if not path.is_file():  # a bare soname for the loader to find: nothing to read
        return None
    facts = read_elf(path)
    if any(n.startswith(("libtorch", "libc10")) for n in facts.needed):
        return PYTORCH
    if any(n.startswith("libtensorflow_framework") for n in facts.needed):
        return TENSORFLOW
    if "RegisterCustomOps" in facts.defined:
        return ONNXRUNTIME
    return None


def framework_library_dir(framework: str, site_dirs: list[str] | None = None) -> Path | None:
    """Where an installed framework keeps its shared libraries, found without importing it:
    the server's, or the one in `site_dirs` (another environment's site-packages)."""
    package, subdir = _PACKAGE_LIB_DIRS[framework]
    if site_dirs is None:
        spec = importlib.util.find_spec(package)
    else:
        spec = importlib.machinery.PathFinder.find_spec(package, site_dirs)
    if spec is None or not spec.submodule_search_locations:
        return None
    directory = Path(next(iter(spec.submodule_search_locations))) / subdir
    return directory if directory.is_dir() else None
