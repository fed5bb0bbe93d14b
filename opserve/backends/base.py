"""The one interface every backend implements, inside a worker process."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from opserve.config.autocomplete import ModelSignature
from opserve.errors import InternalError, InvalidArgumentError, OpserveError
from opserve.proto import ModelConfig


@dataclass
class BackendContext:
    """What a backend is given: the parsed config, where the model is, its op libraries."""

    config: ModelConfig
    model_dir: Path
    version_dir: Path
    op_libraries: list[Path] = field(default_factory=list)  # the model's own, resolved
    server_op_libraries: list[Path] = field(default_factory=list)  # --op-library
    preloaded_libraries: list[Path] = field(default_factory=list)  # LD_PRELOAD

    @property
    def libraries_to_load(self) -> list[Path]:
        """Every op library this model's framework should load, the model's own first.

        Preloaded libraries are loaded here, after the framework, rather than by the dynamic
        loader before Python starts (TensorFlow crashes on a custom-op library preloaded that way).
        """
        return [*self.op_libraries, *self.server_op_libraries, *self.preloaded_libraries]

    @property
    def model_path(self) -> Path:
        return self.version_dir / self.config.default_model_filename


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
    """`load` (op libraries, then the model), `execute` many times, `unload` (idempotent)."""

    def __init__(self, context: BackendContext) -> None:
        self.context = context
        self.loaded_op_libraries: list[Path] = []

    @abstractmethod
    def load(self) -> None: ...

    @abstractmethod
    def signature(self) -> ModelSignature:
        """The model's inputs and outputs as the framework sees them (for auto-complete)."""

    @abstractmethod
    def execute(
        self, inputs: dict[str, np.ndarray], outputs: list[str] | None
    ) -> dict[str, np.ndarray]:
        """Run one (already batched) request; BYTES tensors are object arrays of `bytes`."""

    def unload(self) -> None:  # noqa: B027 - a backend with nothing to release need not override
        """Release the model; safe to call twice."""
