"""The one interface every backend implements, inside a worker process."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from opserve.batching import merge_inputs, split_outputs
from opserve.errors import InternalError, InvalidArgumentError, OpserveError
from opserve.signature import ModelSignature

if TYPE_CHECKING:
    from opserve.proto import ModelConfig


class ModelServices(Protocol):
    """What the worker offers a model beyond answering its requests (the Python backend's
    BLS, logging, custom metrics and decoupled responses use these)."""

    def infer(
        self, request: Any, inputs: dict[str, np.ndarray], decoupled: bool, timeout_us: int
    ) -> Iterator[Reply]: ...

    def call(self, service: str, arguments: dict[str, Any], wait: bool) -> Any: ...

    def respond(self, request: Request, reply: Reply | None, final: bool) -> None: ...

    def poll(self) -> None:
        """Take in what the server has sent meanwhile (cancellations), without waiting."""


@dataclass(slots=True)
class Request:
    """One request as a backend sees it: its wire form, and its inputs as numpy arrays (views of
    shared memory; BYTES as object arrays of `bytes`)."""

    index: int  # its place in the batch
    execution: int  # the id of the execution it belongs to
    id: str
    inputs: dict[str, np.ndarray]
    outputs: list[str] | None  # requested outputs; None means all
    parameters: dict[str, Any]
    correlation_id: int | str = 0
    flags: int = 0
    timeout_us: int = 0
    cancelled: bool = False


@dataclass(slots=True)
class Reply:
    """A backend's answer to one request: outputs, or an error."""

    outputs: dict[str, np.ndarray] | None = None
    error: OpserveError | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class Description:
    """Phase one of a load: the model's signature (the server completes the config from it), or
    the config the model completed itself (Triton JSON), and whether it is decoupled."""

    signature: ModelSignature | None = None
    config_json: str | None = None


@dataclass
class BackendContext:
    """What a backend is given: its config, where the model is, its op libraries."""

    config_bytes: bytes  # a serialized ModelConfig (parsed on first use: needs protobuf)
    config_json: str  # the same config in Triton's JSON form
    model_dir: Path
    version_dir: Path
    op_libraries: list[Path] = field(default_factory=list)  # the model's own, resolved
    server_op_libraries: list[Path] = field(default_factory=list)  # --op-library
    preloaded_libraries: list[Path] = field(default_factory=list)  # LD_PRELOAD
    model_name: str = ""
    version: int = 1
    instance_name: str = ""
    repository: str = ""
    library_frameworks: dict[str, str] = field(default_factory=dict)  # path -> framework
    services: ModelServices | None = None
    auto_complete: bool = True  # False: a Python model's auto_complete_config is not called
    shared: bool = False  # in a worker shared with other models (repository/placement)

    @cached_property
    def config(self) -> ModelConfig:
        from opserve.proto import ModelConfig

        config = ModelConfig()
        config.ParseFromString(self.config_bytes)
        return config

    @property
    def libraries_to_load(self) -> list[Path]:
        """Every op library this model's framework should load, the model's own first.

        Preloaded libraries are loaded here, after the framework, rather than by the dynamic
        loader before Python starts (TensorFlow crashes on a custom-op library preloaded that way).
        """
        return [*self.op_libraries, *self.server_op_libraries, *self.preloaded_libraries]

    @cached_property
    def config_dict(self) -> dict[str, Any]:
        return json.loads(self.config_json)

    @property
    def model_path(self) -> Path:
        return self.version_dir / self.config_dict.get("default_model_filename", "")


MISSING_OP_HINT = (
    "if the model uses custom operations, list their library in its config.pbtxt as "
    'model_operations { op_library_filename: "libmy_ops.so" } (a path inside the model folder), '
    "or load it for every model with --op-library"
)


def exception_message(exc: BaseException) -> str:
    """The framework's own words (TensorFlow keeps them in `.message`)."""
    return getattr(exc, "message", None) or str(exc)


@contextmanager
def translated(action: str, invalid: tuple[type[BaseException], ...]) -> Iterator[None]:
    """A framework's exceptions become opserve errors at the backend boundary: `invalid` ones
    (bad input) are INVALID_ARG, anything else INTERNAL."""
    try:
        yield
    except OpserveError:
        raise
    except invalid as exc:
        raise InvalidArgumentError(f"{action}: {exception_message(exc)}") from exc
    except Exception as exc:
        raise InternalError(f"{action}: {exception_message(exc)}") from exc


class Backend(ABC):
    """Phase one: `describe` (frameworks load the model for it); phase two: `start` with the
    completed config; then `run` many times; `unload` (idempotent).

    Framework backends implement `load`, `signature` and `execute` (one merged batch of arrays);
    `run` merges a batch of requests for them and splits the outputs back, inside the worker.
    A backend that needs each request whole (the Python backend) overrides `run`.
    """

    def __init__(self, context: BackendContext) -> None:
        self.context = context
        self.loaded_op_libraries: list[Path] = []
        self._loaded = False

    def describe(self) -> Description:
        self._load_once()
        return Description(signature=self.signature())

    def start(self, context: BackendContext) -> None:
        """Serve with the completed config (in the worker that described the model, or a new one)."""
        self.context = context
        self._load_once()

    def _load_once(self) -> None:
        if not self._loaded:
            self.load()
            self._loaded = True

    @abstractmethod
    def load(self) -> None:
        """Load the op libraries, then the model."""

    def signature(self) -> ModelSignature:
        """The model's inputs and outputs as the framework sees them (for auto-complete)."""
        return ModelSignature((), ())

    def execute(
        self, inputs: dict[str, np.ndarray], outputs: list[str] | None
    ) -> dict[str, np.ndarray]:
        """Run one (already batched) request; BYTES tensors are object arrays of `bytes`."""
        raise NotImplementedError

    def run(self, requests: list[Request]) -> list[Reply | None] | None:
        """Answer a batch: one reply per request (None for a request, or for the whole batch:
        answered through `ModelServices.respond` instead)."""
        if len(requests) == 1:
            return [Reply(self.execute(requests[0].inputs, requests[0].outputs))]
        sizes = [_batch_size(r) for r in requests]
        merged = merge_inputs([r.inputs for r in requests])
        outputs = self.execute(merged, requests[0].outputs)
        return [Reply(share) for share in split_outputs(outputs, sizes)]

    def unload(self) -> None:  # noqa: B027 - a backend with nothing to release need not override
        """Release the model; safe to call twice."""


def _batch_size(request: Request) -> int:
    first = next(iter(request.inputs.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1
