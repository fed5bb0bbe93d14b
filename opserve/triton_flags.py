"""`tritonserver`'s command line (2.51), flag by flag: what `opserve serve` does with each.

Every flag of `tritonserver --help` is accepted in both `--flag value` and `--flag=value` forms,
with Triton's default. A flag is *honoured*; or it has *no effect here* (GPU pools, backend
directories, thread counts of Triton's own thread pools), and setting it draws one log line
saying so; or only some values can be honoured (`--allow-sagemaker=true`, `--rate-limit
execution_count`), and the others are refused at start-up with a clear error.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opserve.frontends.limits import HTTP_DEFAULT_MAX_INPUT_SIZE
from opserve.remote.locations import repository_argument

NO_EFFECT = "no effect"


def parse_boolean(value: str) -> bool:
    """Triton's boolean flag values."""
    lowered = value.lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {value!r}")


def split_setting(value: str, flag: str, scope: str) -> tuple[str, str, str]:
    """A `[<scope>,]<setting>=<value>` flag value (`--backend-config`, `--trace-config`) as
    (scope, or "" for none; setting; value)."""
    head, _, tail = value.partition(",")
    named, setting = (head, tail) if tail else ("", head)
    key, equals, text = setting.partition("=")
    if not equals:
        raise ValueError(f"{flag} '{value}' must read [<{scope}>,]<setting>=<value>")
    return named, key, text


@dataclass(frozen=True)
class TritonFlag:
    name: str
    type: Callable[[str], Any]
    default: Any
    help: str
    metavar: str = "VALUE"
    repeat: bool = False
    # NO_EFFECT: accepted and logged when set; otherwise honoured (the settings read it)
    effect: str = "honoured"
    # for a flag honoured only for some values: the error for a value that cannot be honoured
    refuse: Callable[[Any], str | None] | None = None


def _only(allowed: Any, why: str) -> Callable[[Any], str | None]:
    return lambda value: None if value == allowed else why


_B, _I, _F, _S = parse_boolean, int, float, str
_GPU = "GPU memory and devices do not exist here"
_POOLS = "Triton's own thread pools do not exist here"

# flags opserve already defines with Triton's names (see cli.py) are not repeated here
TRITON_FLAGS: tuple[TritonFlag, ...] = (
    TritonFlag("--id", _S, "triton", "the server's name in the server metadata (default: triton)"),
    TritonFlag(
        "--exit-timeout-secs",
        _I,
        30,
        "at shutdown, how long in-flight requests may take to finish (default: 30)",
        "SECONDS",
    ),
    TritonFlag("--log-info", _B, True, "log info-level messages (default: true)", "BOOL"),
    TritonFlag("--log-warning", _B, True, "log warnings (default: true)", "BOOL"),
    TritonFlag("--log-error", _B, True, "log errors (default: true)", "BOOL"),
    TritonFlag(
        "--log-format",
        _S,
        "default",
        "log line layout: default (Triton's 'LMMDD hh:mm:ss.ssssss pid file:line] msg'), "
        "ISO8601, or json (one JSON object per line, an opserve extra)",
        "FORMAT",
    ),
    TritonFlag("--log-file", Path, None, "write the log to this file instead of stderr", "PATH"),
    TritonFlag(
        "--model-store",
        repository_argument,
        [],
        "the same as --model-repository (repeatable)",
        "DIR",
        repeat=True,
    ),
    TritonFlag(
        "--exit-on-error",
        _B,
        True,
        "exit when a model fails to load at start-up (default: true); false keeps serving the "
        "others",
        "BOOL",
    ),
    TritonFlag(
        "--strict-readiness",
        _B,
        True,
        "ready only when every model is (default: true); false: ready whenever the server responds",
        "BOOL",
    ),
    TritonFlag(
        "--strict-model-config",
        _B,
        False,
        "DEPRECATED as in Triton: true is --disable-auto-complete-config",
        "BOOL",
    ),
    TritonFlag(
        "--model-config-name",
        _S,
        "",
        "load <model>/configs/<NAME>.pbtxt where it exists instead of config.pbtxt",
        "NAME",
    ),
    TritonFlag(
        "--model-load-thread-count",
        _I,
        4,
        "how many models load at once (default: 4)",
        "N",
    ),
    TritonFlag(
        "--model-load-retry-count",
        _I,
        0,
        "how many times a failed load is retried (default: 0)",
        "N",
    ),
    TritonFlag(
        "--model-namespacing",
        _B,
        False,
        "must be false: models of one name in several repositories are not served",
        "BOOL",
        refuse=_only(False, "--model-namespacing=true is not supported"),
    ),
    TritonFlag("--enable-peer-access", _B, True, _GPU, "BOOL", effect=NO_EFFECT),
    TritonFlag("--allow-http", _B, True, "serve HTTP (default: true)", "BOOL"),
    TritonFlag(
        "--reuse-http-port",
        _B,
        False,
        "let several servers listen on the HTTP port (SO_REUSEPORT)",
        "BOOL",
    ),
    TritonFlag(
        "--http-header-forward-pattern",
        _S,
        "",
        "HTTP headers of inference requests whose names match become request parameters",
        "REGEX",
    ),
    TritonFlag(
        "--http-thread-count",
        _I,
        8,
        "threads that take the frontends' heavy work off the event loop (inflating bodies, "
        "decoding large BYTES tensors); requests themselves are served by one event loop",
        "N",
    ),
    TritonFlag(
        "--http-max-input-size",
        _I,
        HTTP_DEFAULT_MAX_INPUT_SIZE,
        "the largest HTTP request body, after inflating a compressed one (default: 67108864, "
        "64 MiB; Triton 2.59's flag)",
        "BYTES",
        refuse=lambda v: None if v > 0 else "--http-max-input-size must be greater than 0",
    ),
    TritonFlag(
        "--http-restricted-api",
        _S,
        [],
        "APIS:KEY=VALUE: calls to these APIs (health, metadata, inference, shared-memory, "
        "model-config, model-repository, statistics, trace, logging) need that header",
        "APIS:KEY=VALUE",
        repeat=True,
    ),
    TritonFlag(
        "--reuse-grpc-port",
        _B,
        False,
        "let several servers listen on the gRPC port (SO_REUSEPORT)",
        "BOOL",
    ),
    TritonFlag(
        "--grpc-header-forward-pattern",
        _S,
        "",
        "gRPC metadata of inference requests whose keys match become request parameters",
        "REGEX",
    ),
    TritonFlag("--grpc-infer-allocation-pool-size", _I, 8, _POOLS, "N", effect=NO_EFFECT),
    TritonFlag(
        "--grpc-use-ssl",
        _B,
        False,
        "serve gRPC over TLS with --grpc-server-cert and --grpc-server-key",
        "BOOL",
    ),
    TritonFlag(
        "--grpc-use-ssl-mutual",
        _B,
        False,
        "TLS with client certificates checked against --grpc-root-cert (preempts --grpc-use-ssl)",
        "BOOL",
    ),
    TritonFlag("--grpc-server-cert", _S, "", "PEM server certificate (TLS)", "PATH"),
    TritonFlag("--grpc-server-key", _S, "", "PEM server key (TLS)", "PATH"),
    TritonFlag(
        "--grpc-root-cert",
        _S,
        "",
        "PEM root certificate for client certificates (mutual TLS)",
        "PATH",
    ),
    TritonFlag(
        "--grpc-infer-response-compression-level",
        _S,
        "none",
        "none (default), low, medium or high: gzip-compress inference responses",
        "LEVEL",
        refuse=lambda v: (
            None
            if v in ("none", "low", "medium", "high")
            else f"--grpc-infer-response-compression-level must be none, low, medium or high, not {v!r}"
        ),
    ),
    TritonFlag("--grpc-keepalive-time", _I, 7200000, "keepalive ping period, ms", "MS"),
    TritonFlag("--grpc-keepalive-timeout", _I, 20000, "keepalive ping timeout, ms", "MS"),
    TritonFlag(
        "--grpc-keepalive-permit-without-calls", _B, False, "keepalive pings without calls", "BOOL"
    ),
    TritonFlag("--grpc-http2-max-pings-without-data", _I, 2, "pings without data", "N"),
    TritonFlag(
        "--grpc-http2-min-recv-ping-interval-without-data",
        _I,
        300000,
        "minimum interval between received pings without data, ms",
        "MS",
    ),
    TritonFlag("--grpc-http2-max-ping-strikes", _I, 2, "bad pings tolerated", "N"),
    TritonFlag("--grpc-max-connection-age", _I, None, "maximum connection age, ms", "MS"),
    TritonFlag(
        "--grpc-max-connection-age-grace", _I, None, "grace after the maximum age, ms", "MS"
    ),
    TritonFlag(
        "--grpc-restricted-protocol",
        _S,
        [],
        "PROTOCOLS:KEY=VALUE: calls of these protocols (as --http-restricted-api) need that "
        "metadata",
        "PROTOCOLS:KEY=VALUE",
        repeat=True,
    ),
    TritonFlag(
        "--allow-sagemaker",
        _B,
        False,
        "must be false: there is no SageMaker endpoint",
        "BOOL",
        refuse=_only(
            False, "--allow-sagemaker=true is not supported: there is no SageMaker endpoint"
        ),
    ),
    TritonFlag("--sagemaker-port", _I, 8080, "no SageMaker endpoint", "PORT", effect=NO_EFFECT),
    TritonFlag(
        "--sagemaker-safe-port-range", _S, "", "no SageMaker endpoint", "LOW-HIGH", effect=NO_EFFECT
    ),
    TritonFlag("--sagemaker-thread-count", _I, 8, "no SageMaker endpoint", "N", effect=NO_EFFECT),
    TritonFlag(
        "--allow-vertex-ai",
        _B,
        False,
        "must be false: there is no Vertex AI endpoint",
        "BOOL",
        refuse=_only(
            False, "--allow-vertex-ai=true is not supported: there is no Vertex AI endpoint"
        ),
    ),
    TritonFlag("--vertex-ai-port", _I, 8080, "no Vertex AI endpoint", "PORT", effect=NO_EFFECT),
    TritonFlag("--vertex-ai-thread-count", _I, 8, "no Vertex AI endpoint", "N", effect=NO_EFFECT),
    TritonFlag(
        "--vertex-ai-default-model", _S, "", "no Vertex AI endpoint", "NAME", effect=NO_EFFECT
    ),
    TritonFlag(
        "--allow-gpu-metrics", _B, True, "there are no GPUs to report", "BOOL", effect=NO_EFFECT
    ),
    TritonFlag(
        "--allow-cpu-metrics",
        _B,
        True,
        "report CPU utilization and memory (nv_cpu_*) with the metrics (default: true)",
        "BOOL",
    ),
    TritonFlag(
        "--metrics-interval-ms",
        _F,
        2000.0,
        "metrics are computed when scraped",
        "MS",
        effect=NO_EFFECT,
    ),
    TritonFlag(
        "--metrics-config",
        _S,
        [],
        "counter_latencies=BOOL (default true: the latency counters); summaries are not kept",
        "KEY=VALUE",
        repeat=True,
    ),
    TritonFlag(
        "--trace-config",
        _S,
        [],
        "[MODE,]KEY=VALUE: level=OFF|TIMESTAMPS, rate=N, count=N, mode=triton|opentelemetry, "
        "triton,file=PATH, triton,log-frequency=N, opentelemetry,url=URL, "
        "opentelemetry,resource=KEY=VALUE",
        "[MODE,]KEY=VALUE",
        repeat=True,
    ),
    TritonFlag(
        "--backend-directory",
        _S,
        "/opt/tritonserver/backends",
        "backends are built in",
        "DIR",
        effect=NO_EFFECT,
    ),
    TritonFlag(
        "--backend-config",
        _S,
        [],
        "BACKEND,KEY=VALUE or KEY=VALUE: default-max-batch-size is honoured; other keys of "
        "Triton's backends have no effect here",
        "[BACKEND,]KEY=VALUE",
        repeat=True,
    ),
    TritonFlag(
        "--repoagent-directory",
        _S,
        "/opt/tritonserver/repoagents",
        "no repository agents",
        "DIR",
        effect=NO_EFFECT,
    ),
    TritonFlag(
        "--cache-directory",
        _S,
        "/opt/tritonserver/caches",
        "the local cache is built in",
        "DIR",
        effect=NO_EFFECT,
    ),
    TritonFlag(
        "--rate-limit",
        _S,
        "off",
        "must be off: the rate limiter is not supported",
        "MODE",
        refuse=_only("off", "--rate-limit execution_count is not supported"),
    ),
    TritonFlag(
        "--rate-limit-resource",
        _S,
        [],
        "the rate limiter is off",
        "NAME:COUNT:DEVICE",
        repeat=True,
        effect=NO_EFFECT,
    ),
    TritonFlag("--pinned-memory-pool-byte-size", _I, 268435456, _GPU, "BYTES", effect=NO_EFFECT),
    TritonFlag(
        "--cuda-memory-pool-byte-size", _S, [], _GPU, "DEVICE:BYTES", repeat=True, effect=NO_EFFECT
    ),
    TritonFlag(
        "--cuda-virtual-address-size", _S, [], _GPU, "DEVICE:BYTES", repeat=True, effect=NO_EFFECT
    ),
    TritonFlag("--min-supported-compute-capability", _F, 6.0, _GPU, "CC", effect=NO_EFFECT),
    TritonFlag("--buffer-manager-thread-count", _I, 0, _POOLS, "N", effect=NO_EFFECT),
    TritonFlag(
        "--host-policy",
        _S,
        [],
        "host policies (NUMA, CPU cores) have no effect here",
        "NAME,KEY=VALUE",
        repeat=True,
        effect=NO_EFFECT,
    ),
    TritonFlag(
        "--model-load-gpu-limit", _S, [], _GPU, "DEVICE:FRACTION", repeat=True, effect=NO_EFFECT
    ),
    TritonFlag(
        "--response-cache-byte-size",
        _I,
        None,
        "DEPRECATED as in Triton: the same as --cache-config local,size=BYTES",
        "BYTES",
    ),
    TritonFlag(
        "--trace-file",
        _S,
        None,
        "DEPRECATED: --trace-config triton,file=PATH",
        "PATH",
    ),
    TritonFlag(
        "--trace-level",
        _S,
        [],
        "DEPRECATED: --trace-config level=LEVEL",
        "LEVEL",
        repeat=True,
    ),
    TritonFlag("--trace-rate", _I, 1000, "DEPRECATED: --trace-config rate=N", "N"),
    TritonFlag("--trace-count", _I, -1, "DEPRECATED: --trace-config count=N", "N"),
    TritonFlag(
        "--trace-log-frequency",
        _I,
        0,
        "DEPRECATED: --trace-config triton,log-frequency=N",
        "N",
    ),
)


def add_triton_flags(parser: argparse.ArgumentParser) -> None:
    """Every flag of the table, defaulting to None so that what was set can be told apart."""
    group = parser.add_argument_group("tritonserver flags")
    for flag in TRITON_FLAGS:
        group.add_argument(
            flag.name,
            type=flag.type,
            default=None,
            action="append" if flag.repeat else "store",
            metavar=flag.metavar,
            help=f"{flag.help}" + (" [no effect here]" if flag.effect == NO_EFFECT else ""),
        )
    group.add_argument(
        "--disable-auto-complete-config",
        action="store_true",
        help="configs must be complete: nothing is derived from the model files",
    )


def triton_values(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """Each flag's value (its default where unset), and a note for each flag without effect
    that was set (to log once the log is set up); refused values raise ValueError."""
    values: dict[str, Any] = {}
    notes: list[str] = []
    for flag in TRITON_FLAGS:
        key = flag.name[2:].replace("-", "_")
        given = getattr(args, key)
        value = flag.default if given is None else given
        if flag.refuse is not None:
            problem = flag.refuse(value)
            if problem is not None:
                raise ValueError(problem)
        if flag.effect == NO_EFFECT and given is not None:
            notes.append(f"{flag.name} has no effect here: {flag.help}")
        values[key] = value
    values["disable_auto_complete_config"] = args.disable_auto_complete_config
    return values, notes
