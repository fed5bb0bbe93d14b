"""Prepare the example model repository.

- writes the example ONNX models (they are committed too; this keeps them reproducible);
- copies the custom-op library of `onnxruntime-extensions` into the `text_ops` model's own
  folder, where its `model_operations` names it: the model and its ops ship together.

Run: python examples/prepare.py
"""

from __future__ import annotations

import shutil
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent / "model_repository"
TEXT_OPS_LIBRARY = REPOSITORY / "text_ops" / "libortextensions.so"


def write_models() -> None:
    from onnx import TensorProto, helper, save

    def model(nodes, inputs, outputs, opsets=(("", 17),)):
        graph = helper.make_graph(nodes, "graph", inputs, outputs)
        return helper.make_model(
            graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets], ir_version=8
        )

    def tensor(name, elem_type, shape):
        return helper.make_tensor_value_info(name, elem_type, shape)

    # Triton's classic `simple`: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1.
    simple = model(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        [
            tensor("INPUT0", TensorProto.INT32, [None, 16]),
            tensor("INPUT1", TensorProto.INT32, [None, 16]),
        ],
        [
            tensor("OUTPUT0", TensorProto.INT32, [None, 16]),
            tensor("OUTPUT1", TensorProto.INT32, [None, 16]),
        ],
    )
    # String ops from onnxruntime-extensions (domain ai.onnx.contrib).
    text_ops = model(
        [
            helper.make_node("StringUpper", ["TEXT"], ["UPPER"], domain="ai.onnx.contrib"),
            helper.make_node("StringLength", ["TEXT"], ["LENGTH"], domain="ai.onnx.contrib"),
        ],
        [tensor("TEXT", TensorProto.STRING, [None, None])],
        [
            tensor("UPPER", TensorProto.STRING, [None, None]),
            tensor("LENGTH", TensorProto.INT64, [None, None]),
        ],
        opsets=(("", 17), ("ai.onnx.contrib", 1)),
    )
    # A tiny identity with no config.pbtxt at all: everything comes from auto-complete.
    identity = model(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        [tensor("INPUT0", TensorProto.FLOAT, [None, 16])],
        [tensor("OUTPUT0", TensorProto.FLOAT, [None, 16])],
    )
    for name, proto in (("simple", simple), ("text_ops", text_ops), ("identity_fp32", identity)):
        target = REPOSITORY / name / "1" / "model.onnx"
        target.parent.mkdir(parents=True, exist_ok=True)
        save(proto, str(target))


def copy_text_ops_library() -> None:
    from onnxruntime_extensions import get_library_path

    shutil.copyfile(get_library_path(), TEXT_OPS_LIBRARY)


def main() -> None:
    try:
        write_models()
    except ImportError:
        print("onnx is not installed: keeping the committed models")
    copy_text_ops_library()
    print(f"example repository ready: {REPOSITORY}")


if __name__ == "__main__":
    main()
