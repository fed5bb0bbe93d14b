"""The server's settings, as the command line gives them."""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opserve.errors import OpserveError
from opserve.frontends.access import Restriction, compile_pattern, parse_restrictions
from opserve.frontends.grpc.http2 import KeepaliveSettings
from opserve.frontends.limits import GRPC_DEFAULT_MAX_INPUT_SIZE, ConnectionLimits
from opserve.ops import library_framework
from opserve.polling import DEFAULT_BUDGET_US, checked_budget
from opserve.remote.mirror import RepositoryMirror
from opserve.response_cache import CacheSettings, parse_cache_config
from opserve.tracing import TraceConfig, TraceSettings, parse_trace_config
from opserve.triton_flags import parse_boolean, split_setting
from opserve.workers.process import DEFAULT_RING_CAPACITY

log = logging.getLogger(__name__)

# --backend-config keys that mean something here (any backend, or every backend)
HONOURED_BACKEND_CONFIG = ("default-max-batch-size",)


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
    execution_timeout_secs: float = 0.0  # how long one `execute` may run (0: no limit)
    startup_wait_secs: float = 60.0  # how long start-up waits for loads before the ports open
    cache: CacheSettings | None = None  # --cache-config local,size=BYTES
    server_id: str = "triton"
    exit_timeout_secs: int = 30
    exit_on_error: bool = True
    strict_readiness: bool = True
    auto_complete: bool = True
    model_config_name: str = ""
    model_load_thread_count: int = 4
    model_load_retry_count: int = 0
    allow_http: bool = True
    reuse_http_port: bool = False
    reuse_grpc_port: bool = False
    grpc_keepalive: KeepaliveSettings = field(default_factory=KeepaliveSettings)
    grpc_compression: str = "none"
    grpc_tls: GrpcTls | None = None
    http_restrictions: dict[str, Restriction] = field(default_factory=dict)
    grpc_restrictions: dict[str, Restriction] = field(default_factory=dict)
    http_forward: re.Pattern[str] | None = None  # --http-header-forward-pattern
    grpc_forward: re.Pattern[str] | None = None
    counter_latencies: bool = True
    cpu_metrics: bool = True
    default_max_batch_size: dict[str, int] = field(default_factory=dict)  # backend ("" all) -> size
    trace: TraceConfig = field(default_factory=lambda: TraceConfig(TraceSettings()))
    # bounds: a body's size (--http-max-input-size), HTTP read timeouts and connections
    http_limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    # --http-thread-count: threads doing the frontends' heavy work off the event loop
    http_thread_count: int = 8
    grpc_max_input_size: int = GRPC_DEFAULT_MAX_INPUT_SIZE  # --grpc-max-input-size
    max_instances_per_model: int = 64  # worker processes of one model, all versions
    max_instances_total: int = 512  # worker processes of all models
    # repositories in object storage, mirrored into folders of `model_repositories`
    remote_repositories: tuple[RepositoryMirror, ...] = ()
    shared_workers: bool = False  # --shared-workers: a worker per framework for plain models
    # --busy-poll-us: poll, not sleep, while requests are in flight
    busy_poll_us: int = DEFAULT_BUDGET_US

    @classmethod
    def from_flags(
        cls,
        args: argparse.Namespace,
        triton: dict[str, Any],
        repositories: list[Path] | None = None,
        remotes: list[RepositoryMirror] | None = None,
    ) -> ServerSettings:
        """The settings an `opserve serve` command line gives (`triton`: Triton's flags;
        `repositories`: the folders to serve, remote ones already fetched, and their mirrors)."""

        cache = parse_cache_config(args.cache_config)
        if cache is None and triton["response_cache_byte_size"] is not None:
            cache = CacheSettings(triton["response_cache_byte_size"])
        return cls(
            model_repositories=(
                [*args.model_repository, *triton["model_store"]]
                if repositories is None
                else repositories
            ),
            http_address=args.http_address,
            http_port=args.http_port,
            op_libraries=args.op_library,
            log_verbose=args.log_verbose,
            ring_capacity=args.shm_ring_bytes or DEFAULT_RING_CAPACITY,
            model_control_mode=args.model_control_mode,
            repository_poll_secs=args.repository_poll_secs,
            load_models=args.load_model,
            op_library_roots=args.op_library_root,
            allow_grpc=args.allow_grpc,
            grpc_address=args.grpc_address,
            grpc_port=args.grpc_port,
            allow_metrics=args.allow_metrics,
            metrics_address=args.metrics_address,
            metrics_port=args.metrics_port,
            model_load_timeout_secs=args.model_load_timeout_secs,
            execution_timeout_secs=args.execution_timeout_secs,
            startup_wait_secs=args.startup_wait_secs,
            cache=cache,
            server_id=triton["id"],
            exit_timeout_secs=triton["exit_timeout_secs"],
            exit_on_error=triton["exit_on_error"],
            strict_readiness=triton["strict_readiness"],
            auto_complete=not (
                triton["disable_auto_complete_config"] or triton["strict_model_config"]
            ),
            model_config_name=triton["model_config_name"],
            model_load_thread_count=triton["model_load_thread_count"],
            model_load_retry_count=triton["model_load_retry_count"],
            allow_http=triton["allow_http"],
            reuse_http_port=triton["reuse_http_port"],
            reuse_grpc_port=triton["reuse_grpc_port"],
            grpc_keepalive=_grpc_keepalive(triton),
            grpc_compression=triton["grpc_infer_response_compression_level"],
            grpc_tls=_grpc_tls(triton),
            http_restrictions=parse_restrictions(
                triton["http_restricted_api"], "--http-restricted-api"
            ),
            grpc_restrictions=parse_restrictions(
                triton["grpc_restricted_protocol"], "--grpc-restricted-protocol"
            ),
            http_forward=compile_pattern(
                triton["http_header_forward_pattern"], "--http-header-forward-pattern"
            ),
            grpc_forward=compile_pattern(
                triton["grpc_header_forward_pattern"], "--grpc-header-forward-pattern"
            ),
            counter_latencies=_metrics_config(triton["metrics_config"]),
            cpu_metrics=triton["allow_cpu_metrics"],
            default_max_batch_size=_backend_config(triton["backend_config"]),
            trace=parse_trace_config(triton["trace_config"], _deprecated_trace_flags(args)),
            http_limits=_http_limits(args, triton),
            http_thread_count=triton["http_thread_count"],
            grpc_max_input_size=(
                GRPC_DEFAULT_MAX_INPUT_SIZE
                if args.grpc_max_input_size is None
                else args.grpc_max_input_size
            ),
            max_instances_per_model=args.max_instances_per_model,
            max_instances_total=args.max_instances_total,
            remote_repositories=tuple(remotes or ()),
            shared_workers=args.shared_workers,
            busy_poll_us=args.busy_poll_us,
        )

    def __post_init__(self) -> None:
        if not self.model_repositories:
            raise ValueError("at least one --model-repository is required")
        if self.model_control_mode not in ("none", "explicit", "poll"):
            raise ValueError(
                f"--model-control-mode must be none, explicit or poll, not {self.model_control_mode!r}"
            )
        checked_budget(self.busy_poll_us)
        if self.model_load_thread_count < 1:
            raise ValueError("--model-load-thread-count must be at least 1")
        if self.model_load_retry_count < 0:
            raise ValueError("--model-load-retry-count must not be negative")
        if self.model_config_name and any(c.isspace() for c in self.model_config_name):
            raise ValueError("--model-config-name must not contain spaces")
        if self.model_load_timeout_secs <= 0:
            raise ValueError("--model-load-timeout-secs must be positive")
        if self.repository_poll_secs < 0:  # 0: no polling, as in Triton
            raise ValueError("--repository-poll-secs must not be negative")
        if self.http_thread_count < 1:
            raise ValueError("--http-thread-count must be at least 1")
        if not 0 < self.grpc_max_input_size <= GRPC_DEFAULT_MAX_INPUT_SIZE:
            raise ValueError(
                f"--grpc-max-input-size must be between 1 and {GRPC_DEFAULT_MAX_INPUT_SIZE}"
            )
        for flag, count in (
            ("--max-instances-per-model", self.max_instances_per_model),
            ("--max-instances-total", self.max_instances_total),
        ):
            if count < 1:
                raise ValueError(f"{flag} must be at least 1")
        if self.execution_timeout_secs < 0:
            raise ValueError("--execution-timeout-secs must not be negative (0: no limit)")
        if self.startup_wait_secs < 0:
            raise ValueError("--startup-wait-secs must not be negative")
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


@dataclass(frozen=True)
class GrpcTls:
    """--grpc-use-ssl[-mutual]: the server's key and certificate, and for mutual TLS the root
    certificate that client certificates must chain to (all PEM)."""

    key: bytes
    certificate: bytes
    root: bytes | None  # mutual TLS only


def _http_limits(args: argparse.Namespace, triton: dict[str, Any]) -> ConnectionLimits:
    """--http-max-input-size (Triton's) and opserve's HTTP timeouts and connection limit."""
    for flag, seconds in (
        ("--http-header-timeout-secs", args.http_header_timeout_secs),
        ("--http-body-timeout-secs", args.http_body_timeout_secs),
        ("--http-first-request-timeout-secs", args.http_first_request_timeout_secs),
    ):
        if not seconds > 0:
            raise ValueError(f"{flag} must be positive")
    if args.http_max_connections < 0:
        raise ValueError("--http-max-connections must not be negative (0: the default)")
    return ConnectionLimits(
        max_input_size=triton["http_max_input_size"],
        header_timeout_s=args.http_header_timeout_secs,
        body_timeout_s=args.http_body_timeout_secs,
        first_request_timeout_s=args.http_first_request_timeout_secs,
        max_connections=args.http_max_connections,
    )


def _grpc_tls(triton: dict[str, Any]) -> GrpcTls | None:
    mutual = triton["grpc_use_ssl_mutual"]
    if not (mutual or triton["grpc_use_ssl"]):
        return None
    needed = ["grpc_server_key", "grpc_server_cert"] + (["grpc_root_cert"] if mutual else [])
    contents: dict[str, bytes] = {}
    for key in needed:
        flag = "--" + key.replace("_", "-")
        if not triton[key]:
            raise ValueError(f"{flag} is needed with --grpc-use-ssl{'-mutual' if mutual else ''}")
        try:
            contents[key] = Path(triton[key]).read_bytes()
        except OSError as exc:
            raise ValueError(f"{flag} '{triton[key]}': {exc.strerror}") from None
    return GrpcTls(
        contents["grpc_server_key"], contents["grpc_server_cert"], contents.get("grpc_root_cert")
    )


def _deprecated_trace_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The deprecated `--trace-*` flags that were given (`--trace-config` wins over them)."""
    names = ("trace_file", "trace_level", "trace_rate", "trace_count", "trace_log_frequency")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _grpc_keepalive(triton: dict[str, Any]) -> KeepaliveSettings:
    """Triton's gRPC keepalive and connection-age flags (gRPC core's meanings)."""
    return KeepaliveSettings(
        time_ms=triton["grpc_keepalive_time"],
        timeout_ms=triton["grpc_keepalive_timeout"],
        permit_without_calls=triton["grpc_keepalive_permit_without_calls"],
        max_pings_without_data=triton["grpc_http2_max_pings_without_data"],
        min_recv_ping_interval_without_data_ms=triton[
            "grpc_http2_min_recv_ping_interval_without_data"
        ],
        max_ping_strikes=triton["grpc_http2_max_ping_strikes"],
        max_connection_age_ms=triton["grpc_max_connection_age"],
        max_connection_age_grace_ms=triton["grpc_max_connection_age_grace"],
    )


def _metrics_config(values: list[str]) -> bool:
    """`--metrics-config KEY=VALUE`: whether the latency counters are kept."""
    counters = True
    for value in values:
        key, equals, setting = value.partition("=")
        if not equals:
            raise ValueError(f"--metrics-config '{value}' must read <setting>=<value>")
        if key == "counter_latencies":
            counters = _flag_boolean(setting, value)
        elif key == "summary_latencies":
            if _flag_boolean(setting, value):
                raise ValueError("--metrics-config summary_latencies=true is not supported")
        else:
            raise ValueError(f"--metrics-config: unknown setting '{key}'")
    return counters


def _backend_config(values: list[str]) -> dict[str, int]:
    """`--backend-config [BACKEND,]KEY=VALUE`: the keys that mean something here; the others
    are named in the log."""
    sizes: dict[str, int] = {}
    for value in values:
        backend, key, setting_value = split_setting(value, "--backend-config", "backend")
        if key == "default-max-batch-size":
            try:
                sizes[backend] = int(setting_value)
            except ValueError:
                raise ValueError(
                    f"--backend-config {key} needs a whole number, not {setting_value!r}"
                ) from None
        else:
            log.info(
                "--backend-config %s has no effect here (only %s is read)",
                value,
                ", ".join(HONOURED_BACKEND_CONFIG),
            )
    return sizes


def _flag_boolean(text: str, flag: str) -> bool:
    try:
        return parse_boolean(text)
    except argparse.ArgumentTypeError:
        raise ValueError(f"'{flag}': expected true or false") from None
