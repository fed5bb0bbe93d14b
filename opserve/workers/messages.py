"""The typed messages that cross between the server and a worker process.

Each message is a small dataclass with the id of the request it belongs to; it is pickled, but
tensor data never is: a `TensorRef` points into the sender's shared-memory ring (or, when the
ring has no room, carries the bytes inline).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from opserve.config.autocomplete import ModelSignature


@dataclass(slots=True)
class TensorRef:
    name: str
    datatype: str
    shape: tuple[int, ...]
    offset: int = 0  # byte offset in the sender's ring
    nbytes: int = 0
    inline: bytes | None = None  # the data itself when it is not in the ring


@dataclass(slots=True)
class LoadModel:
    id: int
    model_name: str
    version: int
    config: bytes  # a serialized ModelConfig
    model_dir: str
    version_dir: str
    op_libraries: list[str] = field(default_factory=list)  # resolved per-model libraries
    server_op_libraries: list[str] = field(default_factory=list)  # --op-library
    preloaded_libraries: list[str] = field(default_factory=list)  # from LD_PRELOAD


@dataclass(slots=True)
class ModelLoaded:
    id: int
    signature: ModelSignature
    op_libraries: list[str]  # what the backend registered, resolved paths


@dataclass(slots=True)
class Infer:
    id: int
    inputs: list[TensorRef]
    outputs: list[str] | None  # None means all
    ring_end: int  # release the request ring up to here once the inputs are used


@dataclass(slots=True)
class InferResult:
    id: int
    outputs: list[TensorRef]
    ring_end: int  # release the response ring up to here once the outputs are copied
    # time.monotonic_ns() when the worker began (the same clock in every process), and the
    # nanoseconds spent preparing inputs, in the backend, and writing outputs
    started_ns: int = 0
    input_ns: int = 0
    infer_ns: int = 0
    output_ns: int = 0


@dataclass(slots=True)
class UnloadModel:
    id: int


@dataclass(slots=True)
class Done:
    id: int


@dataclass(slots=True)
class Failed:
    id: int
    code: str
    message: str
    ring_end: int = -1  # response ring position to release, when outputs had been written


Message = LoadModel | ModelLoaded | Infer | InferResult | UnloadModel | Done | Failed
