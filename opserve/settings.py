"""The server's settings, as the command line gives them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from opserve.errors import OpserveError
from opserve.ops import library_framework
from opserve.response_cache import CacheSettings
from opserve.workers.process import DEFAULT_RING_CAPACITY


@dataclass(frozen=True)
class ServerSettings:
    model_repositories: list[Path]
    http_address: str = "0.0.0.0"
    http_port: int = 8000
    op_libraries: list[Path] = field(default_factory=list)
    log_verbose: int = 0
    ring_capacity: int = DEFAULT_RING_CAPACITY
    model_control_mode: str = "none"
    repository_poll_secs: float = 15.0
    load_models: list[str] = field(default_factory=list)
    op_library_roots: list[Path] = field(default_factory=list)
    allow_grpc: bool = True
    grpc_address: str = "0.0.0.0"
    grpc_port: int = 8001
    allow_metrics: bool = True
    metrics_address: str = "0.0.0.0"
    metrics_port: int = 8002
    model_load_timeout_secs: float = 600.0
    cache: CacheSettings | None = None  # --cache-config local,size=BYTES

    def __post_init__(self) -> None:
        if not self.model_repositories:
            raise ValueError("at least one --model-repository is required")
        if self.model_control_mode not in ("none", "explicit", "poll"):
            raise ValueError(
                f"--model-control-mode must be none, explicit or poll, not {self.model_control_mode!r}"
            )
        if self.model_load_timeout_secs <= 0:
            raise ValueError("--model-load-timeout-secs must be positive")
        if self.repository_poll_secs <= 0:
            raise ValueError("--repository-poll-secs must be positive")
        if self.load_models and self.model_control_mode != "explicit":
            raise ValueError("--load-model needs --model-control-mode explicit")
        for root in self.op_library_roots:
            if not root.is_dir():
                raise ValueError(f"--op-library-root '{root}' is not a directory")
        for flag, port in (
            ("--http-port", self.http_port),
            ("--grpc-port", self.grpc_port),
            ("--metrics-port", self.metrics_port),
        ):
            if not 0 <= port <= 65535:
                raise ValueError(f"{flag} {port} is not a port number")
        for library in self.op_libraries:
            if not library.is_file():
                raise ValueError(f"--op-library '{library}' does not exist")
            try:
                framework = library_framework(library)
            except OpserveError as exc:
                raise ValueError(f"--op-library '{library}': {exc.message}") from None
            if framework is None:
                raise ValueError(
                    f"--op-library '{library}' links against no framework opserve knows "
                    "(libtorch, libtensorflow_framework) and exports no RegisterCustomOps (ONNX Runtime)"
                )
