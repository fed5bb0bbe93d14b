"""The ops a model file uses that its framework does not provide (its custom ops).

Read from the model file itself, without running it: ONNX nodes of every graph, subgraph and
local function; the `ops.<namespace>.<name>` calls in every method of every TorchScript module;
the op types of a TensorFlow GraphDef or SavedModel, function libraries included. Each is then
looked up in the installed framework. Names follow the op libraries' own (`domain::OpType` for
ONNX Runtime, `namespace::name` for PyTorch, `OpType` for TensorFlow), so that they compare with
what a library registers.

Imports a framework: runs only in a probe (`opserve.ops.probe`) or a worker, never in the server.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# ONNX's standard domain goes by two names
_DEFAULT_DOMAINS = ("", "ai.onnx")


def onnx_custom_ops(path: Path) -> list[str]:
    """ONNX nodes whose (domain, op type) neither ONNX Runtime nor a local function defines."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    functions = {(f.domain, f.name) for f in model.functions}
    provided = _onnxruntime_ops()
    used: set[str] = set()
    nodes = [*_graph_nodes(model.graph)]
    for function in model.functions:
        nodes += [*_nodes(function.node)]
    for node in nodes:
        domain = "" if node.domain in _DEFAULT_DOMAINS else node.domain
        if (node.domain, node.op_type) in functions or (domain, node.op_type) in provided:
            continue
        used.add(f"{node.domain}::{node.op_type}")
    return sorted(used)


def _graph_nodes(graph: Any) -> Iterator[Any]:
    yield from _nodes(graph.node)


def _nodes(nodes: Any) -> Iterator[Any]:
    """Every node, and every node of the subgraphs in its attributes (If, Loop, Scan, ...)."""
    for node in nodes:
        yield node
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from _graph_nodes(attribute.g)
            for graph in attribute.graphs:
                yield from _graph_nodes(graph)


def _onnxruntime_ops() -> set[tuple[str, str]]:
    """(domain, op type) of every op the installed ONNX Runtime implements ('' for ONNX's)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as runtime

    return {
        ("" if s.domain in _DEFAULT_DOMAINS else s.domain, s.name)
        for s in runtime.get_all_operator_schema()
    }


# TorchScript's serialized code calls an operator as `ops.<namespace>.<name>(...)`
_TORCHSCRIPT_CALL = re.compile(r"\bops\.([A-Za-z_]\w*)\.([A-Za-z_]\w*)")
_TORCH_NAMESPACES = ("aten", "prim")  # always the framework's own


def torchscript_custom_ops(path: Path) -> list[str]:
    """`namespace::name` of each operator the archive's code calls that PyTorch does not know
    (every module, submodule and method is in the archive's `code/` files)."""
    import torch

    called: set[str] = set()
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if "/code/" in f"/{name}" and name.endswith(".py"):
                text = archive.read(name).decode("utf-8", "replace")
                called |= {f"{ns}::{op}" for ns, op in _TORCHSCRIPT_CALL.findall(text)}
    return sorted(
        op
        for op in called
        if op.split("::")[0] not in _TORCH_NAMESPACES
        and not torch._C._jit_get_schemas_for_operator(op)
    )


def tensorflow_custom_ops(path: Path) -> list[str]:
    """Op types of a GraphDef file or a SavedModel folder (its graphs and function libraries)
    that the installed TensorFlow has not registered."""
    import tensorflow  # noqa: F401 - registers TensorFlow's own ops
    from tensorflow.core.framework import graph_pb2
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow.python.framework import op_def_registry

    graphs = []
    if path.is_dir():
        saved = saved_model_pb2.SavedModel()
        binary = path / "saved_model.pb"
        if binary.exists():
            saved.ParseFromString(binary.read_bytes())
        else:
            from google.protobuf import text_format

            text_format.Parse((path / "saved_model.pbtxt").read_text(), saved)
        graphs = [meta.graph_def for meta in saved.meta_graphs]
    else:
        graph = graph_pb2.GraphDef()
        graph.ParseFromString(path.read_bytes())
        graphs = [graph]
    used: set[str] = set()
    for graph in graphs:
        functions = {f.signature.name for f in graph.library.function}
        ops = {node.op for node in graph.node}
        for function in graph.library.function:
            ops |= {node.op for node in function.node_def}
        used |= {op for op in ops - functions if op_def_registry.get(op) is None}
    return sorted(used)


_BY_BACKEND = {
    "onnxruntime": onnx_custom_ops,
    "pytorch": torchscript_custom_ops,
    "tensorflow": tensorflow_custom_ops,
}


def model_custom_ops(backend: str, path: Path) -> list[str]:
    """The custom ops of the model file at `path` served by `backend` ([] for other backends)."""
    lister = _BY_BACKEND.get(backend)
    if lister is None:
        return []
    if backend == "onnxruntime" and path.is_dir():  # a folder holding model.onnx and its data
        path = path / "model.onnx"
    return lister(path)
