"""The test suite's custom-op libraries, built from their C++ sources by opserve's own builder
(`opserve.ops.build`, what `opserve ops build` runs) and cached under `.cache/`.

ONNX Runtime's headers are fetched once into `.cache/opserve/onnxruntime-dev` when neither
`$ORT_INCLUDE_DIR` nor an installed `libonnxruntime-dev` provides them.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from opserve.ops.build import build_library
from opserve.ops.headers import onnxruntime_headers as _onnxruntime_headers

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("OPSERVE_TEST_CACHE", ROOT / ".cache"))
# opserve's own cache folder when OPSERVE_CACHE_DIR=CACHE: servers and `opserve ops build`
# commands run with that setting share the builds made here
BUILD_CACHE = CACHE / "opserve"
SOURCES = Path(__file__).resolve().parent


def onnxruntime_headers() -> Path:
    """ONNX Runtime's headers, fetched into the test cache when the machine has none."""
    return _onnxruntime_headers(BUILD_CACHE, fetch=True)


_locks: dict[tuple[object, ...], threading.Lock] = {}
_locks_guard = threading.Lock()


def _build(framework: str, source: Path, name: str, defines: dict[str, str | None]) -> Path:
    """A build the README's `opserve ops build` commands share (same sources, flags, name).
    One build of a library at a time: a test that needs one the background is building waits
    for it (two builds of one library in one process would write the same partial file)."""
    key = (framework, str(source), name, tuple(sorted(defines.items())))
    with _locks_guard:
        lock = _locks.setdefault(key, threading.Lock())
    with lock:
        built = build_library(
            [source], framework, name=name, defines=defines, cache=BUILD_CACHE, fetch_headers=True
        )
    return built.path


def prebuild_in_background() -> None:
    """Start the suite's slowest builds (PyTorch and TensorFlow libraries, ~20-30 s each) one
    after another on a thread of their own, while the first tests run: the suite runs one test
    at a time and leaves the second core mostly idle. A build that fails here is left to the
    test that needs it, which builds it again and reports why."""
    builds: list[Callable[[], Path]] = []
    if importlib.util.find_spec("torch") is not None:
        builds += [pytorch_my_ops, pytorch_my_ops_v2]
    if importlib.util.find_spec("tensorflow") is not None:
        builds += [tensorflow_zero_out, tensorflow_zero_out_keeping_last]

    def run() -> None:
        for build in builds:
            try:
                build()
            except Exception:  # noqa: BLE001 - the test that needs it reports it
                pass

    threading.Thread(target=run, name="prebuild", daemon=True).start()


def onnxruntime_my_ops(
    add_value: float = 1.0, name: str = "libmy_ops.so", request_api_version: int | None = None
) -> Path:
    defines: dict[str, str | None] = {} if add_value == 1.0 else {"ADD_VALUE": f"{add_value}f"}
    if request_api_version is not None:
        defines["REQUEST_API_VERSION"] = str(request_api_version)
    return _build("onnxruntime", SOURCES / "onnxruntime" / "my_ops.cc", name, defines)


def pytorch_my_ops(
    add_value: float = 1.0, name: str = "libmy_torch_ops.so", needs_missing_symbol: bool = False
) -> Path:
    """my_ops::custom_modulo and my_ops::add_one for TorchScript."""
    defines: dict[str, str | None] = {} if add_value == 1.0 else {"ADD_VALUE": repr(add_value)}
    if needs_missing_symbol:
        defines["NEEDS_MISSING_SYMBOL"] = "1"
    return _build("pytorch", SOURCES / "pytorch" / "my_ops.cc", name, defines)


def tensorflow_zero_out(name: str = "libzero_out.so", keep_last: bool = False) -> Path:
    """The classic ZeroOut op for TensorFlow, with the flags TensorFlow gives."""
    defines: dict[str, str | None] = {"KEEP_LAST": "1"} if keep_last else {}
    return _build("tensorflow", SOURCES / "tensorflow" / "zero_out.cc", name, defines)


def pytorch_my_ops_v2() -> Path:
    """The same ops as `pytorch_my_ops` under the same names, adding 2: a colliding library."""
    return pytorch_my_ops(2.0, name="libmy_torch_ops_v2.so")


def tensorflow_zero_out_keeping_last() -> Path:
    """ZeroOut registered under the same name, keeping the last element: a colliding library."""
    return tensorflow_zero_out(name="libzero_out_last.so", keep_last=True)


def opserve(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`opserve ARGS` as a command, sharing the test suite's builds (OPSERVE_CACHE_DIR)."""
    return subprocess.run(
        [sys.executable, "-m", "opserve", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OPSERVE_CACHE_DIR": str(CACHE), **(env or {})},
        cwd=cwd,
    )


def copy_to(library: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(library, target)
    return target


if __name__ == "__main__":  # python tests/oplibs/build.py: build everything once
    print(onnxruntime_my_ops())
    print(pytorch_my_ops())
    print(tensorflow_zero_out())
    sys.exit(0)
