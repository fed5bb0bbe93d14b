"""The typed messages that cross between the server and a worker process, in both directions.

Each message is a small dataclass with an id; it is pickled, but tensor data never is: a
`TensorRef` points into the sender's shared-memory ring (or, when the ring has no room, carries
the bytes inline). The server sends into the request ring, the worker into the response ring.

Ids: the server numbers what it starts (loads, executions, cancellations), the worker numbers what
it starts (BLS requests, metric calls); each side answers with the id it was given.

This module imports neither protobuf nor a framework: a worker under another interpreter (a
per-model environment) needs only the standard library and numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from opserve.signature import ModelSignature


@dataclass(slots=True)
class TensorRef:
    name: str
    datatype: str
    shape: tuple[int, ...]
    offset: int = 0  # byte offset in the sender's ring
    nbytes: int = 0
    inline: bytes | None = None  # the data itself when it is not in the ring


@dataclass(slots=True)
class WireRequest:
    """One inference request, whole: what the model sees of it."""

    id: str
    inputs: list[TensorRef]
    outputs: list[str] | None  # requested outputs; None means all
    parameters: dict[str, Any] = field(default_factory=dict)
    correlation_id: int | str = 0
    flags: int = 0
    model_name: str = ""  # set on BLS requests
    model_version: str = ""
    timeout_us: int = 0


@dataclass(slots=True)
class WireError:
    code: str
    message: str


@dataclass(slots=True)
class WireResponse:
    """One response to request `index` of an execution (or of a BLS call)."""

    index: int
    outputs: list[TensorRef] | None = None  # None: no response, only a flag
    error: WireError | None = None
    final: bool = True
    parameters: dict[str, Any] = field(default_factory=dict)


# server -> worker --------------------------------------------------------------------------------
@dataclass(slots=True)
class LoadModel:
    """Phase 1 (`describe=True`): load enough to describe the model (its signature, or its own
    auto-completed config). Phase 2: start serving with the completed config."""

    id: int
    model_name: str
    version: int
    config: bytes  # a serialized ModelConfig
    config_json: str  # the same config in Triton's JSON form
    model_dir: str
    version_dir: str
    instance_name: str = ""
    describe: bool = False
    op_libraries: list[str] = field(default_factory=list)  # resolved per-model libraries
    server_op_libraries: list[str] = field(default_factory=list)  # --op-library
    preloaded_libraries: list[str] = field(default_factory=list)  # from LD_PRELOAD
    repository: str = ""  # the model's repository folder
    library_frameworks: dict[str, str] = field(default_factory=dict)  # path -> framework
    auto_complete: bool = True  # False: --disable-auto-complete-config
    slot: int = 0  # the instance's place in a shared worker (0 in a worker of its own)


@dataclass(slots=True)
class Execute:
    """A batch of requests for one execution; the request ring up to `ring_end` is theirs."""

    id: int
    requests: list[WireRequest]
    ring_end: int
    slot: int = 0  # the instance that runs it (a shared worker hosts many)
    # how long the worker polls for its next message, after this execution, before it
    # sleeps (the whole budget when the server is quiet, a share under load; `opserve.polling`)
    poll_us: int = 0


@dataclass(slots=True)
class Cancel:
    """The client of request `index` of execution `id` went away."""

    id: int
    index: int


@dataclass(slots=True)
class UnloadModel:
    """Unload one instance of a shared worker (`slot`), which goes on serving the others; or
    (None) everything, after which the worker ends."""

    id: int
    slot: int | None = None


@dataclass(slots=True)
class BlsResult:
    """An answer to a worker's `BlsRequest`; its tensors are in the request ring up to `ring_end`."""

    id: int
    response: WireResponse
    ring_end: int


@dataclass(slots=True)
class CallResult:
    id: int
    value: Any = None
    error: WireError | None = None


# worker -> server --------------------------------------------------------------------------------
@dataclass(slots=True)
class ModelLoaded:
    id: int
    signature: ModelSignature | None  # phase 1 of a framework model
    op_libraries: list[str]  # what the backend registered, resolved paths
    config_json: str | None = None  # phase 1 of a model that completes its own config


@dataclass(slots=True)
class Responses:
    """Responses of execution `id`; outputs are in the response ring before `ring_end`.

    A non-decoupled model answers every request at once, with the execution's timings
    (`time.monotonic_ns()` when the worker began: the same clock in every process, and the
    nanoseconds spent preparing inputs, executing, and writing outputs). A decoupled model sends
    responses as it makes them, then `Executed` when `execute` returns.
    """

    id: int
    responses: list[WireResponse]
    ring_end: int
    timings: tuple[int, int, int, int] | None = None


@dataclass(slots=True)
class Executed:
    id: int
    timings: tuple[int, int, int, int]


@dataclass(slots=True)
class Done:
    id: int


@dataclass(slots=True)
class Failed:
    id: int
    code: str
    message: str
    ring_end: int = -1  # response ring position to release, when outputs had been written


@dataclass(slots=True)
class BlsRequest:
    """A model asks the server to run `request` (tensors in the response ring before `ring_end`)."""

    id: int
    request: WireRequest
    decoupled: bool
    timeout_us: int
    ring_end: int


@dataclass(slots=True)
class Call:
    """A model's call on a server service that answers (`CallResult`) unless `id` is 0.

    `service` is "log" or "metric"; `arguments` are the service's own.
    """

    id: int
    service: str
    arguments: dict[str, Any]


Message = (
    LoadModel
    | ModelLoaded
    | Execute
    | Cancel
    | Responses
    | Executed
    | UnloadModel
    | Done
    | Failed
    | BlsRequest
    | BlsResult
    | Call
    | CallResult
)
