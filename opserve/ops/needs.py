"""What a model needs against what its op libraries register, and the line that fixes a gap.

Pure functions over op names and the file system (no framework): `opserve check` compares the
custom ops a probe found in the model file with the ops of the model's libraries; the server
reads the op a framework's load error names. Either way, a library in the model's folder (or a
sibling model's) that registers the op, but is not listed, is named with the exact
`model_operations` line to add.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from opserve.ops.frameworks import PYTHON_OPS_SUFFIX

# a framework's load error naming an op it does not know -> the op, named as libraries name it
_MISSING_OP_PATTERNS = (
    # ONNX Runtime: "Fatal error: my_ops:AddOne(-1) is not a registered function/op"
    (re.compile(r"([\w.\-]*):(\w+)\(-?\d+\) is not a registered function/op"), "{0}::{1}"),
    # PyTorch: "Unknown builtin op: my_ops::add_one."
    (re.compile(r"Unknown builtin op: ([\w.]+)::(\w+)"), "{0}::{1}"),
    # TensorFlow: "Op type not registered 'ZeroOut' in binary running on ..."
    (re.compile(r"Op type not registered '(\w+)'"), "{0}"),
)

LIBRARY_SUFFIXES = (".so",)
PYTHON_OPS_MARK = "onnx_op"  # a Python file that defines ops with onnxruntime-extensions


def missing_op_in(message: str) -> str | None:
    """The op a framework's error says it does not know, or None."""
    for pattern, form in _MISSING_OP_PATTERNS:
        found = pattern.search(message)
        if found:
            return form.format(*found.groups())
    return None


def missing_ops(needed: Iterable[str], registered: Iterable[str]) -> list[str]:
    """The needed ops that no library registers (ONNX Runtime's unnamed domain is ONNX's)."""
    known = set(registered)
    return [op for op in needed if op not in known]


def is_op_library_file(path: Path) -> bool:
    """A shared library, or a Python file that defines ONNX Runtime ops with `onnx_op`."""
    if path.suffix == PYTHON_OPS_SUFFIX:
        return is_python_ops_file(path)
    return path.is_file() and (path.suffix in LIBRARY_SUFFIXES or ".so." in path.name)


def is_python_ops_file(path: Path) -> bool:
    try:
        return path.is_file() and PYTHON_OPS_MARK in path.read_text(errors="replace")
    except OSError:
        return False


def candidate_libraries(model_dir: Path, listed: Iterable[Path] = ()) -> list[Path]:
    """Op libraries that a model could list: in its folder and version folders first, then in
    its sibling models' folders; the ones it already lists are left out."""
    skip = {p.resolve() for p in listed}
    found: list[Path] = []
    siblings = sorted(p for p in model_dir.parent.iterdir() if p.is_dir() and p != model_dir)
    for folder in [model_dir, *siblings]:
        for path in _files_in(folder):
            resolved = path.resolve()
            if resolved not in skip and resolved not in found and is_op_library_file(path):
                found.append(resolved)
    return found


def _files_in(model_dir: Path) -> list[Path]:
    """The files of a model's folder and of its subfolders (one level: the version folders)."""
    try:
        entries = sorted(model_dir.iterdir())
        nested = [c for e in entries if e.is_dir() for c in sorted(e.iterdir())]
    except OSError:
        return []
    return [p for p in [*entries, *nested] if p.is_file()]


def model_operations_line(library: Path, model_dir: Path, version_dir: Path | None = None) -> str:
    """The config line that makes the model load `library`: a path inside the model's folder is
    relative (a file of the version folder by its bare name), another one absolute."""
    library = library.resolve()
    if version_dir is not None and library.parent == version_dir.resolve():
        name = library.name
    elif library.is_relative_to(model_dir.resolve()):
        name = library.relative_to(model_dir.resolve()).as_posix()
    else:
        name = str(library)
    return f'model_operations {{ op_library_filename: "{name}" }}'


def unlisted_library_hint(
    op: str,
    library: Path,
    model_dir: Path,
    version_dir: Path | None = None,
) -> str:
    """'<library> registers <op> but is not listed: add <line> to config.pbtxt'."""
    line = model_operations_line(library, model_dir, version_dir)
    return (
        f"'{library}' registers op '{op}' but the model does not list it: add "
        f"{line} to '{model_dir / 'config.pbtxt'}'"
    )


_FRAMEWORK_NAMES = {"onnxruntime": "ONNX Runtime", "pytorch": "PyTorch", "tensorflow": "TensorFlow"}


def missing_op_problem(op: str, framework: str, hint: str | None) -> str:
    """The error for an op the model uses that neither its framework nor its libraries provide."""
    message = (
        f"the model uses op '{op}', which neither {_FRAMEWORK_NAMES.get(framework, framework)} nor the model's op libraries "
        "(its own, --op-library, LD_PRELOAD) provide"
    )
    return f"{message}; {hint}" if hint else message
