"""Probing a custom-op library in a throwaway process: which ops it registers, and whether the
installed framework can load it at all.

Run as `python -m opserve.ops.probe FRAMEWORK PATH`; prints one JSON object:
`{"framework_version": ..., "ops": [...], "error": null | "...", "api_version": n | null}`.
A library that crashes the probe crashes only the probe. Never run in a serving process.

`python -m opserve.ops.probe models` (jobs as JSON on stdin) loads model versions as their
workers would, for `opserve check`: the custom ops each model file uses (`opserve.ops.usage`)
and the signature its backend describes.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from typing import Any


def probe_pytorch(path: str) -> dict[str, Any]:
    import torch

    before = set(torch._C._dispatch_get_all_op_names())
    torch.ops.load_library(path)
    after = set(torch._C._dispatch_get_all_op_names())
    return {"framework_version": torch.__version__, "ops": sorted(after - before)}


def probe_tensorflow(path: str) -> dict[str, Any]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf
    from tensorflow.core.framework import op_def_pb2
    from tensorflow.python.client import pywrap_tf_session

    handle = pywrap_tf_session.TF_LoadLibrary(path)  # what tf.load_op_library does first
    op_list = op_def_pb2.OpList()
    op_list.ParseFromString(pywrap_tf_session.TF_GetOpList(handle))
    return {"framework_version": tf.__version__, "ops": sorted(op.name for op in op_list.op)}


# ONNX Runtime has no way to list the ops a library registers, so the probe hands the library's
# RegisterCustomOps a copy of the real API table in which CreateCustomOpDomain and
# CustomOpDomain_Add are wrapped to record what passes through. Their indices are fixed by ORT's
# append-only C ABI; OrtCustomOp.GetName sits after `uint32_t version` and `CreateKernel`.
_CREATE_CUSTOM_OP_DOMAIN = 26
_CUSTOM_OP_DOMAIN_ADD = 27
_CREATE_SESSION_OPTIONS = 10
_GET_NAME_OFFSET = 16
_TABLE_POINTERS = 2048


def _mapping_end(address: int) -> int:
    with open("/proc/self/maps") as maps:
        for line in maps:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            if start <= address < end:
                return end
    return address + _TABLE_POINTERS * 8


def _function(kind: Any, address: int | None) -> Any:
    """A C function pointer as a callable of ctypes type `kind`."""
    if not address:
        raise RuntimeError("onnxruntime's API table has a null entry")
    return kind(address)


def probe_onnxruntime(path: str) -> dict[str, Any]:
    import onnxruntime

    capi = os.path.join(os.path.dirname(onnxruntime.__file__), "capi")
    runtime = next(f for f in sorted(os.listdir(capi)) if f.startswith("libonnxruntime.so"))
    ort = ctypes.CDLL(os.path.join(capi, runtime))

    get_api_type = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_uint32)
    version_type = ctypes.CFUNCTYPE(ctypes.c_char_p)

    class OrtApiBase(ctypes.Structure):
        _fields_ = [("GetApi", get_api_type), ("GetVersionString", version_type)]

    ort.OrtGetApiBase.restype = ctypes.POINTER(OrtApiBase)
    real_base = ort.OrtGetApiBase().contents
    max_version = int(real_base.GetVersionString().decode().split(".")[1])  # API N is release 1.N

    status_2 = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
    create_type = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)
    domains: dict[int, str] = {}
    ops: list[str] = []
    requested: list[int] = []
    tables: list[Any] = []  # keep the copies alive
    real: dict[str, Any] = {}

    def create_domain(name: bytes, out: int) -> int:
        status = real["create"](name, out)
        if not status:
            domains[ctypes.c_void_p.from_address(out).value or 0] = name.decode()
        return status or 0

    def add_op(domain: int, op: int) -> int:
        get_name = _function(
            ctypes.CFUNCTYPE(ctypes.c_char_p, ctypes.c_void_p),
            ctypes.c_void_p.from_address(op + _GET_NAME_OFFSET).value,
        )
        ops.append(f"{domains.get(domain, '?')}::{get_name(op).decode()}")
        return real["add"](domain, op) or 0

    create_hook = create_type(create_domain)
    add_hook = status_2(add_op)

    def get_api(version: int) -> int:
        requested.append(version)
        # said at once: a library that gets no API table usually crashes right after
        print(f"{API_VERSION_MARK}{version}", file=sys.stderr, flush=True)
        if version > max_version:
            return 0
        table = real_base.GetApi(version)
        if not table:
            return 0
        count = min(_TABLE_POINTERS, (_mapping_end(table) - table) // 8)
        copy = (ctypes.c_void_p * count)()
        ctypes.memmove(copy, table, count * 8)
        real["create"] = create_type(copy[_CREATE_CUSTOM_OP_DOMAIN])
        real["add"] = status_2(copy[_CUSTOM_OP_DOMAIN_ADD])
        copy[_CREATE_CUSTOM_OP_DOMAIN] = ctypes.cast(create_hook, ctypes.c_void_p).value
        copy[_CUSTOM_OP_DOMAIN_ADD] = ctypes.cast(add_hook, ctypes.c_void_p).value
        tables.append(copy)
        return ctypes.addressof(copy)

    get_api_hook = get_api_type(get_api)
    fake_base = OrtApiBase(get_api_hook, real_base.GetVersionString)

    api = (ctypes.c_void_p * 64).from_address(real_base.GetApi(1))
    create_options = _function(
        ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)),
        api[_CREATE_SESSION_OPTIONS],
    )
    options = ctypes.c_void_p()
    if create_options(ctypes.byref(options)):
        raise RuntimeError("onnxruntime could not create session options")

    library = ctypes.CDLL(path, mode=os.RTLD_NOW | os.RTLD_LOCAL)
    if not hasattr(library, "RegisterCustomOps"):
        raise RuntimeError("the library does not export RegisterCustomOps")
    register = library.RegisterCustomOps
    register.restype = ctypes.c_void_p
    register.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    status = register(options, ctypes.addressof(fake_base))
    result: dict[str, Any] = {
        "framework_version": onnxruntime.__version__,
        "api_version": max(requested) if requested else None,
        "ops": sorted(ops),
    }
    if requested and max(requested) > max_version:
        result["error"] = api_mismatch(max(requested), onnxruntime.__version__)
    elif status:
        get_message = _function(ctypes.CFUNCTYPE(ctypes.c_char_p, ctypes.c_void_p), api[2])
        result["error"] = (
            f"RegisterCustomOps failed: {get_message(status).decode(errors='replace')}"
        )
    return result


API_VERSION_MARK = "opserve-probe: requested ONNX Runtime API version "


def api_mismatch(requested: int, installed: str) -> str:
    return (
        f"built for ONNX Runtime API version {requested} (onnxruntime 1.{requested}); "
        f"this server has onnxruntime {installed}, whose API goes up to {installed.split('.')[1]}"
    )


def probe_python_ops(path: str) -> dict[str, Any]:
    """A Python file of onnxruntime-extensions ops: run it, then list what the extensions
    library registers with ONNX Runtime (its own ops and the file's)."""
    from pathlib import Path

    from opserve.backends.onnx_python_ops import load_python_ops

    return probe_onnxruntime(str(load_python_ops(Path(path))))


def probe_loader(path: str) -> dict[str, Any]:
    """A library of no known framework: can the dynamic loader load it at all?"""
    ctypes.CDLL(path, mode=os.RTLD_NOW | os.RTLD_LOCAL)
    return {"ops": []}


PROBES = {
    "pytorch": probe_pytorch,
    "tensorflow": probe_tensorflow,
    "onnxruntime": probe_onnxruntime,
    "python_ops": probe_python_ops,
    "loader": probe_loader,
}


_PACKAGES = {
    "pytorch": "torch",
    "tensorflow": "tensorflow",
    "onnxruntime": "onnxruntime",
    "python_ops": "onnxruntime",
}

MODEL_RESULT_MARK = "opserve-probe-models: "


def probe_model(job: dict[str, Any]) -> dict[str, Any]:
    """One model version, as a worker would load it: the custom ops its file uses, and the
    signature its backend describes (with the model's op libraries loaded)."""
    import base64
    from pathlib import Path

    from opserve.backends import BackendContext, backend_class
    from opserve.errors import OpserveError
    from opserve.ops.usage import model_custom_ops

    result: dict[str, Any] = {"uses": [], "uses_error": None, "signature": None, "error": None}
    context = BackendContext(
        config_bytes=base64.b64decode(job["config"]),
        config_json=job["config_json"],
        model_dir=Path(job["model_dir"]),
        version_dir=Path(job["version_dir"]),
        op_libraries=[Path(p) for p in job["op_libraries"]],
        server_op_libraries=[Path(p) for p in job["server_op_libraries"]],
        preloaded_libraries=[Path(p) for p in job["preloaded_libraries"]],
        model_name=job["model"],
    )
    try:
        result["uses"] = model_custom_ops(job["backend"], context.model_path)
    except Exception as exc:  # an unreadable model file is the load's to report
        result["uses_error"] = f"{type(exc).__name__}: {exc}"
    try:
        backend = backend_class(job["backend"])(context)
        signature = backend.describe().signature
        backend.unload()
    except OpserveError as exc:
        result["error"] = exc.message
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    else:
        if signature is not None:
            result["signature"] = {
                kind: [[t.name, t.datatype, list(t.shape)] for t in tensors]
                for kind, tensors in (("inputs", signature.inputs), ("outputs", signature.outputs))
            }
    return result


def main_models() -> None:
    """`python -m opserve.ops.probe models`: jobs as a JSON list on stdin; results as one
    marked JSON line (a model's own prints cannot be taken for it)."""
    jobs = json.loads(sys.stdin.read())
    results = [probe_model(job) for job in jobs]
    sys.stdout.write(MODEL_RESULT_MARK + json.dumps(results) + "\n")
    sys.stdout.flush()
    os._exit(0)


def main(argv: list[str]) -> None:
    if argv == ["models"]:
        main_models()
    framework, path = argv
    try:
        result = {"error": None, **PROBES[framework](path)}
    except ImportError as exc:
        result = {"error": f"{framework} is not installed: {exc}", "ops": []}
    except Exception as exc:  # the framework's loader message is the fact we want
        cause = f" ({exc.__cause__})" if exc.__cause__ else ""
        result = {"error": f"{type(exc).__name__}: {exc}{cause}", "ops": []}
        module = sys.modules.get(_PACKAGES.get(framework, ""))
        if module is not None:  # the framework itself loaded: say which one it is
            result["framework_version"] = getattr(module, "__version__", None)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    # Skip the libraries' static destructors: some would call into the probe's borrowed tables.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
