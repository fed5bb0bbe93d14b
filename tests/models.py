"""Toy ONNX models and model folders for the tests, written with `onnx.helper`."""

from __future__ import annotations

from pathlib import Path

from onnx import TensorProto, helper, save

ONNX_TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def onnx_model(nodes, inputs, outputs, domains: tuple[str, ...] = ()):
    graph = helper.make_graph(nodes, "graph", inputs, outputs)
    opsets = [helper.make_opsetid("", 17)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


def tensor(name: str, datatype: str, shape: list[int | None]):
    return helper.make_tensor_value_info(name, ONNX_TYPES[datatype], shape)


def identity(
    datatype: str = "FP32", shape: list[int | None] | None = None, names=("INPUT0", "OUTPUT0")
):
    shape = shape if shape is not None else [None, 16]
    return onnx_model(
        [helper.make_node("Identity", [names[0]], [names[1]])],
        [tensor(names[0], datatype, shape)],
        [tensor(names[1], datatype, shape)],
    )


def all_types_identity():
    """One identity per datatype: IN_<T> -> OUT_<T>, each of shape [-1]."""
    nodes, inputs, outputs = [], [], []
    for datatype in ONNX_TYPES:
        nodes.append(helper.make_node("Identity", [f"IN_{datatype}"], [f"OUT_{datatype}"]))
        inputs.append(tensor(f"IN_{datatype}", datatype, [None]))
        outputs.append(tensor(f"OUT_{datatype}", datatype, [None]))
    return onnx_model(nodes, inputs, outputs)


def small_ints_identity():
    """IN_<T> -> OUT_<T> of shape [-1] for the integers gRPC carries in 32-bit contents."""
    names = ("INT8", "INT16", "UINT8", "UINT16")
    return onnx_model(
        [helper.make_node("Identity", [f"IN_{t}"], [f"OUT_{t}"]) for t in names],
        [tensor(f"IN_{t}", t, [None]) for t in names],
        [tensor(f"OUT_{t}", t, [None]) for t in names],
    )


def add_sub(datatype: str = "INT32", dims: int = 16):
    """Triton's `simple`: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1."""
    return onnx_model(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        [tensor("INPUT0", datatype, [None, dims]), tensor("INPUT1", datatype, [None, dims])],
        [tensor("OUTPUT0", datatype, [None, dims]), tensor("OUTPUT1", datatype, [None, dims])],
    )


def custom_op(op: str = "AddOne", domain: str = "my_ops"):
    """One custom op of `domain` on an FP32 tensor [-1, 4]."""
    return onnx_model(
        [helper.make_node(op, ["INPUT0"], ["OUTPUT0"], domain=domain)],
        [tensor("INPUT0", "FP32", [None, 4])],
        [tensor("OUTPUT0", "FP32", [None, 4])],
        domains=(domain,),
    )


def write_model(
    repository: Path,
    name: str,
    model=None,
    config: str | None = None,
    versions: tuple[int | str, ...] = (1,),
    filename: str = "model.onnx",
) -> Path:
    """A model folder: `config.pbtxt` (when given) and `model` saved in each version folder."""
    folder = repository / name
    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (folder / "config.pbtxt").write_text(config)
    for version in versions:
        (folder / str(version)).mkdir(exist_ok=True)
        if model is not None:
            target = folder / str(version) / filename
            target.parent.mkdir(parents=True, exist_ok=True)
            save(model, str(target))
    return folder
