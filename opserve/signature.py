"""A model's inputs and outputs as its framework sees them, described inside a worker.

Kept free of protobuf so that a worker running under another interpreter (a per-model
environment) can describe its model with the standard library and numpy alone.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: str  # V2 name; "" when the model does not say
    shape: tuple[int, ...]  # full shape, -1 for a dynamic dimension
    optional: bool = False  # need not be given (ONNX: an overridable initializer)


@dataclass(frozen=True, slots=True)
class ModelSignature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def supports_batching(self) -> bool:
        """Every input (but the optional ones) and output has a dynamic first dimension."""
        tensors = tuple(t for t in self.inputs if not t.optional) + self.outputs
        return bool(tensors) and all(t.shape and t.shape[0] == -1 for t in tensors)
