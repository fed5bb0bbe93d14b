"""Triton's classification extension, protocol-free: an output requested with a class count
comes back as its top classes, "value:index[:label]" strings (BYTES), instead of its data.

Triton's rules (server `src/classification.cc`, the frontends' response code; core
`label_provider.cc`): a model that batches is classified per batch entry (shape `[batch, k]`),
any other model over the whole tensor (shape `[k]`), `k` the smaller of the count and the
entry's element count; classes in descending value order; the value printed as C++'s
`std::to_string` prints it (floats with six decimals); labels are the lines of the output's
`label_filename` (in the model folder), the label of a class being the line at its index.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from opserve.datatypes import NUMPY_DTYPES, serialize_bytes
from opserve.errors import InternalError, InvalidArgumentError, UnsupportedError
from opserve.inference import Tensor
from opserve.proto import ModelConfig

MAX_ELEMENTS = 1_000_000  # Triton's bound on the elements classified per batch entry
_CLASSIFIABLE = frozenset(
    {"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP32", "FP64"}
)


def output_labels(config: ModelConfig, directory: Path) -> dict[str, list[bytes]]:
    """The labels of every output with a `label_filename`, read once when the model loads."""
    labels: dict[str, list[bytes]] = {}
    root = directory.resolve()
    for output in config.output:
        if not output.label_filename:
            continue
        path = directory / output.label_filename
        if not path.resolve().is_relative_to(root):  # Triton's words
            raise UnsupportedError(
                f"label file path '{path}' for output '{output.name}' in model "
                f"'{config.name}' is outside model directory"
            )
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise InternalError(
                f"failed to open text file for read {path}: {exc.strerror}"
            ) from None
        lines = content.split(b"\n")
        if lines[-1] == b"":  # as getline reads it: no line after the last newline
            lines.pop()
        labels[output.name] = lines
    return labels


def classify(tensor: Tensor, count: int, batching: bool, labels: list[bytes]) -> Tensor:
    """The output as its top `count` classes (one row per batch entry when the model batches)."""
    if tensor.datatype not in _CLASSIFIABLE:  # Triton's words
        raise InvalidArgumentError(
            f"class result not available for output due to unsupported type '{tensor.datatype}'"
        )
    dtype = NUMPY_DTYPES[tensor.datatype]
    values = np.frombuffer(tensor.data, dtype=dtype)
    batched = batching and len(tensor.shape) > 0
    rows = tensor.shape[0] if batched else 1
    per_row = int(np.prod(tensor.shape[1:] if batched else tensor.shape, dtype=np.int64))
    if per_row > MAX_ELEMENTS:
        raise InvalidArgumentError("classification output tensor too large")
    floating = dtype is not None and dtype.kind == "f"
    strings: list[bytes] = []
    for row in range(rows):
        entry = values[row * per_row : (row + 1) * per_row]
        for index in _top(entry, count):
            value = float(entry[index]) if floating else int(entry[index])
            text = (f"{value:f}" if floating else str(value)) + f":{index}"
            label = labels[index] if index < len(labels) else b""
            strings.append(text.encode() + (b":" + label if label else b""))
    shape = ((rows,) if batched else ()) + (min(count, per_row),)
    return Tensor(tensor.name, "BYTES", shape, serialize_bytes(strings))


def _top(values: np.ndarray, count: int) -> list[int]:
    """Indices of the `count` largest values, largest first; equal values by index."""
    n = len(values)
    if n == 0:
        return []
    # a stable ascending sort of the reversed values, read backwards: descending, ties in order
    order = (n - 1 - np.argsort(values[::-1], kind="stable"))[::-1]
    return [int(i) for i in order[:count]]
