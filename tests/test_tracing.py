"""The trace extension: settings, sampling, Triton's trace file and OpenTelemetry spans."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from opserve.errors import InvalidArgumentError, UnsupportedError
from opserve.tracing import TraceConfig, Tracer, TraceSettings, parse_trace_config
from tests import models
from tests.conftest import add_constant
from tests.serving import RunningServer, free_port


def tracer(**settings) -> Tracer:
    return Tracer(TraceConfig(TraceSettings(**settings)))


def test_one_request_in_every_rate_is_traced_while_the_count_lasts() -> None:
    sampling = tracer(trace_level=["TIMESTAMPS"], trace_rate=2, trace_count=2, trace_file="f")
    traced = [sampling.sample("m", "") is not None for _ in range(8)]
    assert traced == [False, True, False, True, False, False, False, False]
    assert sampling.settings().trace_count == 0


def test_model_settings_override_the_global_ones_until_cleared() -> None:
    settings = tracer(trace_file="f")
    assert settings.sample("m", "") is None  # level OFF
    settings.update("m", {"trace_level": ["TIMESTAMPS"], "trace_rate": "1"})
    assert settings.settings("m").to_json()["trace_level"] == ["TIMESTAMPS"]
    assert settings.settings().trace_level == ["OFF"]
    assert settings.sample("m", "") is not None and settings.sample("n", "") is None
    settings.update("m", {"trace_level": None})
    assert settings.sample("m", "") is None


@pytest.mark.parametrize(
    "changes, error",
    [
        ({"trace_rate": "0"}, "'trace_rate' must be between 1 and 2147483647"),
        ({"trace_rate": "99999999999999999999"}, "must be between 1 and 2147483647, not 9999"),
        ({"trace_rate": 1.5}, "expecting an integer for 'trace_rate', not 1.5"),
        ({"trace_rate": True}, "expecting an integer for 'trace_rate', not True"),
        ({"trace_level": ["LOUD"]}, "unknown trace level 'LOUD'"),
        ({"trace_level": [5]}, "expecting a string or an array of strings for 'trace_level'"),
        ({"trace_level": [None]}, "expecting a string or an array of strings"),
        ({"trace_count": "many"}, "expecting an integer for 'trace_count'"),
        ({"trace_file": "/etc/passwd"}, "cannot be changed through the protocol"),
        ({"trace_colour": "1"}, "unknown trace setting"),
    ],
)
def test_bad_updates_are_refused_and_change_nothing(changes: dict, error: str) -> None:
    settings = tracer(trace_file="f")
    with pytest.raises(InvalidArgumentError, match=error):
        settings.update("", {"trace_level": ["TIMESTAMPS"], **changes})
    assert settings.settings().trace_level == ["OFF"]


def test_turning_tracing_on_without_a_trace_file_changes_nothing() -> None:
    settings = tracer()  # mode triton, no file
    with pytest.raises(InvalidArgumentError, match="needs --trace-config triton,file=PATH"):
        settings.update("", {"trace_level": ["TIMESTAMPS"]})
    assert settings.settings().trace_level == ["OFF"] and not settings.active


def test_tensors_level_is_unsupported() -> None:
    with pytest.raises(UnsupportedError):
        tracer().update("", {"trace_level": ["TENSORS"]})


def test_trace_config_flags() -> None:
    config = parse_trace_config(
        [
            "level=TIMESTAMPS",
            "rate=5",
            "mode=opentelemetry",
            "opentelemetry,url=localhost:4318/v1/traces",
            "opentelemetry,resource=service.name=edge",
        ],
        {},
    )
    assert config.settings.trace_rate == 5 and config.settings.trace_mode == "opentelemetry"
    assert config.otel_url == "http://localhost:4318/v1/traces"
    assert config.otel_resource == {"service.name": "edge"}
    deprecated = parse_trace_config(
        [], {"trace_file": "t.json", "trace_level": ["TIMESTAMPS"], "trace_rate": 1}
    )
    assert deprecated.settings.trace_file == "t.json" and deprecated.settings.on
    with pytest.raises(ValueError, match="needs a file"):
        parse_trace_config(["level=TIMESTAMPS"], {})
    with pytest.raises(ValueError, match="unknown trace mode 'jaeger'"):
        parse_trace_config(["jaeger,url=x"], {})


# real servers -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("tracing") / "repository"
    models.write_model(repo, "plus_one", add_constant(1.0))
    models.write_model(repo, "plus_two", add_constant(2.0))
    return repo


def infer(client, model: str) -> None:
    tensor = httpclient.InferInput("INPUT0", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 4), dtype=np.float32))
    client.infer(model, [tensor], request_id="r-1")


def test_triton_mode_writes_tritons_trace_file(repository: Path, tmp_path: Path) -> None:
    trace_file = tmp_path / "trace.json"
    args = [
        "--trace-config",
        "level=TIMESTAMPS",
        "--trace-config",
        "rate=1",
        "--trace-config",
        f"triton,file={trace_file}",
    ]
    with RunningServer([repository], args) as server:
        client = httpclient.InferenceServerClient(server.url)
        assert client.get_trace_settings()["trace_level"] == ["TIMESTAMPS"]
        # plus_two: not traced (its own level OFF); plus_one: traced
        client.update_trace_settings("plus_two", {"trace_level": ["OFF"]})
        assert client.get_trace_settings("plus_two")["trace_level"] == ["OFF"]
        infer(client, "plus_one")
        infer(client, "plus_two")
        grpc = grpcclient.InferenceServerClient(server.grpc_url)
        answer = grpc.get_trace_settings(as_json=True)
        assert answer["settings"]["trace_rate"]["value"] == ["1"]
        grpc.close()
        bad = requests.post(f"http://{server.url}/v2/trace/setting", json={"trace_rate": "0"})
        assert bad.status_code == 400
    entries = json.loads(trace_file.read_text())
    models_traced = [e["model_name"] for e in entries if "model_name" in e]
    assert models_traced == ["plus_one"]
    stamps = next(e["timestamps"] for e in entries if "timestamps" in e)
    names = [s["name"] for s in stamps]
    for name in ("REQUEST_START", "QUEUE_START", "COMPUTE_START", "COMPUTE_END", "REQUEST_END"):
        assert name in names
    ns = {s["name"]: s["ns"] for s in stamps}
    assert (
        ns["REQUEST_START"]
        <= ns["QUEUE_START"]
        <= ns["COMPUTE_START"]
        <= ns["COMPUTE_END"]
        <= ns["REQUEST_END"]
    )


class _Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP collector: keeps the spans it is sent."""

    spans: list = []

    def do_POST(self) -> None:  # noqa: N802 - the handler's name is http.server's
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = trace_service_pb2.ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                _Collector.spans.extend(scope.spans)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()
        self.wfile.write(trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[str]:
    pytest.importorskip("opentelemetry.sdk")
    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Collector.spans = []
    yield f"127.0.0.1:{port}"
    server.shutdown()


def test_opentelemetry_mode_exports_spans_naming_the_model(
    repository: Path, collector: str
) -> None:
    args = [
        "--trace-config",
        "level=TIMESTAMPS",
        "--trace-config",
        "rate=1",
        "--trace-config",
        "mode=opentelemetry",
        "--trace-config",
        f"opentelemetry,url=http://{collector}/v1/traces",
    ]
    with RunningServer([repository], args) as server:
        infer(httpclient.InferenceServerClient(server.url), "plus_one")
    deadline = time.monotonic() + 30
    while len(_Collector.spans) < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    by_name = {span.name: span for span in _Collector.spans}
    assert set(by_name) == {"request", "queue", "compute_input", "compute_infer", "compute_output"}
    request = by_name["request"]
    attributes = {a.key: a.value.string_value for a in request.attributes}
    assert attributes["triton.model_name"] == "plus_one"
    assert attributes["triton.model_version"] == "1"
    assert attributes["triton.request_id"] == "r-1"
    assert by_name["queue"].parent_span_id == request.span_id
    assert request.start_time_unix_nano <= by_name["compute_infer"].start_time_unix_nano
