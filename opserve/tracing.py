"""Triton's trace extension: which requests are traced, and where their traces go.

Settings have Triton's names and string values (`trace_level`, `trace_rate`, `trace_count`,
`log_frequency`, `trace_file`, `trace_mode`), globally and per model (a model's own setting
overrides the global one until it is cleared). One request in every `trace_rate` is traced
while `trace_count` allows (-1: without end). A trace holds Triton's timestamps (REQUEST_START,
QUEUE_START, COMPUTE_START, COMPUTE_INPUT_END, COMPUTE_OUTPUT_START, COMPUTE_END,
REQUEST_END); mode `triton` writes them to Triton's JSON trace file, mode `opentelemetry`
exports them as spans over OTLP/HTTP with the OpenTelemetry SDK (imported only then).
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from opserve.errors import InvalidArgumentError, UnsupportedError
from opserve.triton_flags import split_setting

log = logging.getLogger(__name__)

LEVELS = ("OFF", "TIMESTAMPS")
MODES = ("triton", "opentelemetry")
DEFAULT_OTEL_URL = "http://localhost:4318/v1/traces"
_KEYS = ("trace_level", "trace_rate", "trace_count", "log_frequency", "trace_file", "trace_mode")


@dataclass
class TraceSettings:
    trace_level: list[str] = field(default_factory=lambda: ["OFF"])
    trace_rate: int = 1000
    trace_count: int = -1
    log_frequency: int = 0
    trace_file: str = ""
    trace_mode: str = "triton"

    @property
    def on(self) -> bool:
        return "TIMESTAMPS" in self.trace_level

    def to_json(self) -> dict[str, Any]:
        """As Triton answers: the level a list, every other value a string."""
        return {
            "trace_level": list(self.trace_level),
            "trace_rate": str(self.trace_rate),
            "trace_count": str(self.trace_count),
            "log_frequency": str(self.log_frequency),
            "trace_file": self.trace_file,
            "trace_mode": self.trace_mode,
        }


def parse_level(values: list[Any]) -> list[str]:
    if not all(isinstance(v, str) for v in values):
        raise InvalidArgumentError(
            f"expecting a string or an array of strings for 'trace_level', not {values!r}"
        )
    levels = [v.upper() for v in values]
    for level in levels:
        if level == "TENSORS":
            raise UnsupportedError("trace level TENSORS is not supported: use TIMESTAMPS")
        if level not in LEVELS:
            raise InvalidArgumentError(
                f"unknown trace level '{level}': expecting OFF or TIMESTAMPS"
            )
    if "TIMESTAMPS" in levels:
        return ["TIMESTAMPS"]
    return ["OFF"]


INT32_MAX = (1 << 31) - 1  # Triton reads these settings as C ints


def _integer(key: str, value: Any, minimum: int) -> int:
    """An integer setting, given as Triton's protocol gives it (a string of digits) or as a
    JSON integer; a fraction or a boolean is refused, not rounded."""
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        number = int(value)
    if number is None:
        raise InvalidArgumentError(f"expecting an integer for '{key}', not {value!r}")
    if not minimum <= number <= INT32_MAX:
        raise InvalidArgumentError(
            f"'{key}' must be between {minimum} and {INT32_MAX}, not {number}"
        )
    return number


@dataclass(frozen=True)
class TraceConfig:
    """What `--trace-config` (and Triton's deprecated trace flags) say."""

    settings: TraceSettings
    otel_url: str = DEFAULT_OTEL_URL
    otel_resource: dict[str, str] = field(default_factory=dict)


def parse_trace_config(values: list[str], deprecated: dict[str, Any]) -> TraceConfig:
    """`--trace-config [MODE,]KEY=VALUE` flags over the deprecated `--trace-*` ones."""
    settings = TraceSettings()
    if deprecated.get("trace_file"):
        settings.trace_file = deprecated["trace_file"]
    if deprecated.get("trace_level"):
        settings.trace_level = parse_level(deprecated["trace_level"])
    settings.trace_rate = deprecated.get("trace_rate", settings.trace_rate)
    settings.trace_count = deprecated.get("trace_count", settings.trace_count)
    settings.log_frequency = deprecated.get("trace_log_frequency", settings.log_frequency)
    url, resource = DEFAULT_OTEL_URL, {}
    for value in values:
        mode, key, text = split_setting(value, "--trace-config", "mode")
        try:
            if mode == "":
                if key == "level":
                    settings.trace_level = parse_level([text])
                elif key == "rate":
                    settings.trace_rate = _integer("rate", text, 1)
                elif key == "count":
                    settings.trace_count = _integer("count", text, -1)
                elif key == "mode":
                    if text not in MODES:
                        raise ValueError(
                            f"--trace-config mode must be triton or opentelemetry, not {text!r}"
                        )
                    settings.trace_mode = text
                else:
                    raise ValueError(f"--trace-config: unknown setting '{key}'")
            elif mode == "triton":
                if key == "file":
                    settings.trace_file = text
                elif key == "log-frequency":
                    settings.log_frequency = _integer("log-frequency", text, 0)
                else:
                    raise ValueError(f"--trace-config triton: unknown setting '{key}'")
            elif mode == "opentelemetry":
                if key == "url":
                    url = text if "://" in text else f"http://{text}"
                elif key == "resource":
                    name, _, attribute = text.partition("=")
                    resource[name] = attribute
                else:
                    raise ValueError(f"--trace-config opentelemetry: unknown setting '{key}'")
            else:
                raise ValueError(f"--trace-config: unknown trace mode '{mode}'")
        except (InvalidArgumentError, UnsupportedError) as exc:
            raise ValueError(f"--trace-config '{value}': {exc.message}") from None
    if settings.on and settings.trace_mode == "triton" and not settings.trace_file:
        raise ValueError("tracing in mode triton needs a file: --trace-config triton,file=PATH")
    return TraceConfig(settings, url, resource)


@dataclass(slots=True)
class Trace:
    """One traced request; timestamps on the monotonic clock."""

    id: int
    model_name: str
    model_version: str = ""
    request_id: str = ""
    timestamps: list[tuple[str, int]] = field(default_factory=list)

    def mark(self, name: str, ns: int | None = None) -> None:
        self.timestamps.append((name, time.monotonic_ns() if ns is None else ns))

    def compute(
        self, queued_ns: int, started_ns: int, input_ns: int, infer_ns: int, output_ns: int
    ) -> None:
        """The scheduler's part: queued, then the execution's three phases."""
        self.mark("QUEUE_START", queued_ns)
        self.mark("COMPUTE_START", started_ns)
        self.mark("COMPUTE_INPUT_END", started_ns + input_ns)
        self.mark("COMPUTE_OUTPUT_START", started_ns + input_ns + infer_ns)
        self.mark("COMPUTE_END", started_ns + input_ns + infer_ns + output_ns)


class TraceExporter(Protocol):
    def export(self, trace: Trace) -> None: ...
    def close(self) -> None: ...


class TritonFileExporter:
    """Triton's trace file: a JSON array of each trace's model entry and its timestamps;
    written at exit (`log_frequency` 0) or every `log_frequency` traces to `<file>.<n>`."""

    def __init__(self, path: str, log_frequency: int) -> None:
        self.path = path
        self.log_frequency = log_frequency
        self._entries: list[dict[str, Any]] = []
        self._traces = 0
        self._files = itertools.count()
        self._lock = threading.Lock()

    def export(self, trace: Trace) -> None:
        with self._lock:
            self._entries.append(
                {
                    "id": trace.id,
                    "model_name": trace.model_name,
                    "model_version": int(trace.model_version)
                    if trace.model_version.isdigit()
                    else -1,
                    "request_id": trace.request_id,
                }
            )
            self._entries.append(
                {
                    "id": trace.id,
                    "timestamps": [{"name": n, "ns": ns} for n, ns in trace.timestamps],
                }
            )
            self._traces += 1
            if self.log_frequency and self._traces >= self.log_frequency:
                self._write(f"{self.path}.{next(self._files)}")

    def _write(self, path: str) -> None:
        Path(path).write_text(json.dumps(self._entries, indent=2))
        self._entries, self._traces = [], 0

    def close(self) -> None:
        with self._lock:
            if self._entries or not self.log_frequency:
                self._write(
                    self.path if not self.log_frequency else f"{self.path}.{next(self._files)}"
                )


class OpenTelemetryExporter:
    """Spans over OTLP/HTTP: `request` with `queue`, `compute_input`, `compute_infer` and
    `compute_output` inside it, the model's name and version as attributes."""

    def __init__(self, url: str, resource: dict[str, str]) -> None:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError:
            raise ValueError(
                "--trace-config mode=opentelemetry needs the OpenTelemetry SDK: "
                "pip install 'opserve[trace]'"
            ) from None
        attributes = {"service.name": "opserve", **resource}
        self._provider = TracerProvider(resource=Resource.create(attributes))
        self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
        self._tracer = self._provider.get_tracer("opserve")
        self._epoch_offset = time.time_ns() - time.monotonic_ns()

    def export(self, trace: Trace) -> None:
        from opentelemetry import trace as otel

        at = {name: ns + self._epoch_offset for name, ns in trace.timestamps}
        attributes: dict[str, str | int] = {
            "triton.model_name": trace.model_name,
            "triton.model_version": trace.model_version,
            "triton.request_id": trace.request_id,
            "triton.trace_id": trace.id,
        }
        root = self._tracer.start_span(
            "request", start_time=at["REQUEST_START"], attributes=attributes
        )
        context = otel.set_span_in_context(root)
        for name, start, end in (
            ("queue", "QUEUE_START", "COMPUTE_START"),
            ("compute_input", "COMPUTE_START", "COMPUTE_INPUT_END"),
            ("compute_infer", "COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START"),
            ("compute_output", "COMPUTE_OUTPUT_START", "COMPUTE_END"),
        ):
            if start in at and end in at:
                span = self._tracer.start_span(
                    name, context=context, start_time=at[start], attributes=attributes
                )
                span.end(end_time=at[end])
        root.end(end_time=at.get("REQUEST_END", time.time_ns()))

    def close(self) -> None:
        self._provider.shutdown()  # flushes what is batched


class Tracer:
    """The trace settings (global and per model) and the sampling of requests."""

    def __init__(self, config: TraceConfig | None = None) -> None:
        config = config or TraceConfig(TraceSettings())
        self.config = config
        self.global_settings = config.settings
        self.model_settings: dict[str, dict[str, Any]] = {}  # a model's own settings
        self._seen: dict[str, int] = {}  # requests per model since the settings last changed
        self._ids = itertools.count(1)
        self._exporter: TraceExporter | None = None
        self.active = self._any_on()

    # settings ----------------------------------------------------------------------------------
    def settings(self, model: str = "") -> TraceSettings:
        own = self.model_settings.get(model, {}) if model else {}
        return replace(self.global_settings, **own)

    def update(self, model: str, changes: dict[str, Any]) -> TraceSettings:
        """Triton's trace-setting update: values as strings (the level a list of them); None
        clears a model's own setting. All or nothing."""
        parsed: dict[str, Any] = {}
        for key, value in changes.items():
            if key not in _KEYS:
                raise InvalidArgumentError(f"unknown trace setting '{key}'")
            if key in ("trace_file", "trace_mode"):
                current = getattr(self.settings(model), key)
                if value is not None and value != current:
                    raise InvalidArgumentError(
                        f"'{key}' cannot be changed through the protocol; start the server "
                        "with --trace-config"
                    )
                continue
            if value is None:
                if not model:
                    raise InvalidArgumentError(f"the global '{key}' cannot be cleared")
                parsed[key] = None
            elif key == "trace_level":
                parsed[key] = parse_level(value if isinstance(value, list) else [value])
            else:
                minimum = {"trace_rate": 1, "trace_count": -1, "log_frequency": 0}[key]
                parsed[key] = _integer(key, value, minimum)
        turning_on = parsed.get("trace_level") == ["TIMESTAMPS"]
        if turning_on and self._exporter is None:
            self._exporter = self._make_exporter()  # may refuse: then nothing has changed
        if model:
            own = self.model_settings.setdefault(model, {})
            for key, value in parsed.items():
                if value is None:
                    own.pop(key, None)
                else:
                    own[key] = value
        else:
            for key, value in parsed.items():
                setattr(self.global_settings, key, value)
        self._seen.clear()
        self.active = self._any_on()
        return self.settings(model)

    def _any_on(self) -> bool:
        return self.global_settings.on or any(
            "TIMESTAMPS" in s.get("trace_level", []) for s in self.model_settings.values()
        )

    # requests ----------------------------------------------------------------------------------
    def start(self) -> None:
        if self.active:
            self._exporter = self._make_exporter()

    def _make_exporter(self) -> TraceExporter:
        settings = self.global_settings
        if settings.trace_mode == "opentelemetry":
            return OpenTelemetryExporter(self.config.otel_url, self.config.otel_resource)
        if not settings.trace_file:
            raise InvalidArgumentError(
                "tracing in mode triton needs --trace-config triton,file=PATH"
            )
        return TritonFileExporter(settings.trace_file, settings.log_frequency)

    def sample(self, model: str, request_id: str) -> Trace | None:
        """A trace for this request, if it is to be traced."""
        settings = self.settings(model)
        if not settings.on or settings.trace_count == 0:
            return None
        seen = self._seen[model] = self._seen.get(model, 0) + 1
        if seen % settings.trace_rate:
            return None
        if settings.trace_count > 0:
            self._count_down(model, settings.trace_count - 1)
        trace = Trace(next(self._ids), model, request_id=request_id)
        trace.mark("REQUEST_START")
        return trace

    def _count_down(self, model: str, remaining: int) -> None:
        if model in self.model_settings and "trace_count" in self.model_settings[model]:
            self.model_settings[model]["trace_count"] = remaining
        else:
            self.global_settings.trace_count = remaining

    def finish(self, trace: Trace, model_version: str) -> None:
        trace.model_version = model_version
        trace.mark("REQUEST_END")
        if self._exporter is not None:
            try:
                self._exporter.export(trace)
            except Exception:  # a trace must never fail a request
                log.exception("exporting trace %d failed", trace.id)

    def close(self) -> None:
        if self._exporter is not None:
            self._exporter.close()
