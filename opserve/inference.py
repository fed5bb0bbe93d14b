"""Protocol-free inference requests and responses, as the dataplane and workers see them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from opserve.datatypes import NUMPY_DTYPES, deserialize_bytes, numpy_to_v2, serialize_bytes
from opserve.errors import OpserveError
from opserve.tracing import Trace


@dataclass(slots=True)
class Tensor:
    """A named tensor whose data is raw: little-endian elements, or length-prefixed BYTES."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: bytes | memoryview

    def to_numpy(self) -> np.ndarray:
        """A numpy view of the data (BYTES: an object array of `bytes`)."""
        dtype = NUMPY_DTYPES[self.datatype]
        if dtype is None:
            elements = deserialize_bytes(self.data)
            array = np.empty(len(elements), dtype=np.object_)
            array[:] = elements
            return array.reshape(self.shape)
        return np.frombuffer(self.data, dtype=dtype).reshape(self.shape)

    @classmethod
    def from_numpy(cls, name: str, array: np.ndarray, datatype: str | None = None) -> Tensor:
        datatype = datatype or numpy_to_v2(array.dtype)
        if datatype == "BYTES":
            data: bytes = serialize_bytes(_as_bytes(e) for e in array.reshape(-1))
        else:
            dtype = NUMPY_DTYPES[datatype]
            data = np.ascontiguousarray(array, dtype=dtype).tobytes()
        return cls(name, datatype, tuple(int(d) for d in array.shape), data)


def _as_bytes(element: Any) -> bytes:
    if isinstance(element, bytes):
        return element
    if isinstance(element, str):
        return element.encode()
    if isinstance(element, np.bytes_):
        return bytes(element)
    return str(element).encode()


class OutputBuffer(Protocol):
    """Memory the client gave for one output (a registered shared-memory region)."""

    def write(self, data: bytes | memoryview) -> memoryview:
        """Copy an output's raw bytes there: the bytes written, as a view."""
        ...


@dataclass(slots=True)
class InferenceRequest:
    model_name: str
    model_version: str  # "" means the model's latest ready version
    inputs: list[Tensor]
    requested_outputs: list[str] | None = None  # None means every output
    id: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    correlation_id: int | str = 0
    flags: int = 0
    timeout_us: int = 0  # Triton's `timeout` parameter: fail the request after this long
    priority: int = 0  # Triton's `priority` parameter (0: the model's default level)
    # called when the request has to wait for an instance: a frontend may then start watching
    # for its client going away (cancelling the request drops it before it runs)
    on_wait: Callable[[], None] | None = None
    # whether the client has gone away, for a frontend that can tell cheaply: the scheduler
    # then asks instead of having the request watched
    client_gone: Callable[[], bool] | None = None
    trace: Trace | None = None  # when the request is traced (the trace extension)
    # told the compute durations (input, infer, output ns) of the request once it succeeded:
    # an ensemble adds up its steps' (Triton's secondary statistics aggregator)
    stats_sink: Callable[[int, int, int], None] | None = None
    # outputs the client wants in its own memory: the server copies them there straight from
    # the worker's response ring
    output_buffers: dict[str, OutputBuffer] | None = None
    # outputs asked for as their top classes (Triton's classification extension): name -> count
    classification: dict[str, int] | None = None
    # the body was one tensor without a header (HTTP's raw binary request): the model's one
    # input, its datatype and shape deduced from the config
    raw_input: bool = False
    # requests with the same signature (a frontend's decoded header, `frontends/http/templates`)
    # have inputs of the same names, datatypes, shapes and sizes, the same requested outputs and
    # parameters: the dataplane checks the first of them against the config, and trusts the rest
    signature: object | None = None


@dataclass(slots=True)
class InferenceResponse:
    model_name: str
    model_version: str
    outputs: list[Tensor]
    id: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)


# What a model delivers for one request: a response, an error, or (None) only a final flag.
Delivery = InferenceResponse | OpserveError | None
