"""The server process's own CPU per inference, with no load tool competing for the cores.

With `perf_analyzer`, the load tool, the server and the model's worker share this machine's two
cores, and the same run measures 15-25 % apart from one minute to the next. Here the load comes
from inside the server's process: its own protocol objects (`HttpConnection`, `Http2Connection`)
are fed the bytes perf_analyzer sends (the binary tensor extension over HTTP, a
`ModelInferRequest` over gRPC with HPACK-indexed headers from the second call on), through an
in-memory transport, closed loop at a given concurrency. Everything behind the protocol is real:
the dataplane, the scheduler with dynamic batching, the worker process running the identity
`model.py` that `benchmarks/python_identity_vs_triton.py` compares with Triton. What is left
out is the client's sockets (the system calls that read requests and write answers).

    python benchmarks/server_cpu.py [--transport http|grpc|both] [--concurrency 4] [-n 20000]
        [--calls] [--profile FILE] [--ensemble]

It prints, per inference: the server's CPU time (all its threads), the wall time, how many
inferences an execution held; `--calls` also counts the Python function calls the server made
per inference (a count, not a time: the same on every run, so a change that removes work shows
at once); `--profile` writes a cProfile of the measured part. `--ensemble` loads the ensemble of
`benchmarks/ensemble_vs_triton.py` instead (two identity steps in a chain: an inference there is
one request to the ensemble, two to the identity model).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import resource
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ensemble_vs_triton import ENSEMBLE, ENSEMBLE_CONFIG  # noqa: E402

from opserve.custom_metrics import CustomMetrics  # noqa: E402
from opserve.dataplane import DataPlane  # noqa: E402
from opserve.frontends.grpc.calls import GrpcCalls  # noqa: E402
from opserve.frontends.grpc.http2 import Http2Connection, KeepaliveSettings  # noqa: E402
from opserve.frontends.grpc.server import methods_of  # noqa: E402
from opserve.frontends.grpc.servicer import InferenceServicer  # noqa: E402
from opserve.frontends.http import HttpApp  # noqa: E402
from opserve.frontends.http.protocol import HttpConnection  # noqa: E402
from opserve.frontends.limits import GRPC_DEFAULT_MAX_INPUT_SIZE  # noqa: E402
from opserve.proto import service_pb2  # noqa: E402
from opserve.repository import ModelManager  # noqa: E402
from opserve.services import ServerServices  # noqa: E402

MODEL = "identity"
TARGET = MODEL  # the model the requests name: the identity, or the ensemble around it
CONFIG = """name: "identity"
backend: "python"
max_batch_size: 64
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
dynamic_batching { }
"""
MODEL_PY = """import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", x)]))
        return out
"""
TENSOR = bytes(range(64))  # FP32 [1, 16], as perf_analyzer --shape INPUT0:16 sends it


def http_request() -> bytes:
    """What perf_analyzer sends over HTTP (recorded from perf_analyzer 2.51)."""
    header = (
        b'{"id":"","inputs":[{"name":"INPUT0","datatype":"FP32","shape":[1,16],'
        b'"parameters":{"binary_data_size":64}}],'
        b'"outputs":[{"name":"OUTPUT0","parameters":{"binary_data":true}}]}'
    )
    body = header + TENSOR
    return (
        b"POST /v2/models/%s/infer HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
        b"User-Agent: libcurl-agent/1.0\r\nAccept: */*\r\n"
        b"Inference-Header-Content-Length: %d\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n"
        % (TARGET.encode(), len(header), len(body))
    ) + body


class GrpcClient:
    """The frames of perf_analyzer's gRPC calls: HPACK through one encoder, so the headers of
    every call after the first are a block of indexed fields, as gRPC's client sends them."""

    HEADERS = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/inference.GRPCInferenceService/ModelInfer"),
        (":authority", "127.0.0.1:8001"),
        ("te", "trailers"),
        ("content-type", "application/grpc"),
        ("user-agent", "grpc-c++/1.67.1 grpc-c/44.0.0 (linux; chttp2)"),
    ]

    def __init__(self) -> None:
        import hpack

        self.encoder = hpack.Encoder()
        request = service_pb2.ModelInferRequest(model_name=TARGET)
        request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
        request.outputs.add(name="OUTPUT0")
        request.raw_input_contents.append(TENSOR)
        message = request.SerializeToString()
        self.message = b"\x00" + struct.pack(">I", len(message)) + message
        self.next_stream = 1
        self.indexed: bytes | None = None

    @staticmethod
    def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload))[1:]
            + bytes([kind, flags])
            + struct.pack(">I", stream)
            + payload
        )

    def preface(self) -> bytes:
        settings = struct.pack(">HI", 4, 1 << 30)  # SETTINGS_INITIAL_WINDOW_SIZE
        return (
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            + self.frame(4, 0, 0, settings)
            + self.frame(8, 0, 0, struct.pack(">I", (1 << 31) - 1 - 65535))  # connection window
        )

    def call(self) -> bytes:
        stream = self.next_stream
        self.next_stream += 2
        if self.indexed is None:  # the first two blocks; from the second on, the same bytes
            block = self.encoder.encode(self.HEADERS)
            self.indexed = block if stream > 1 else None
        else:
            block = self.indexed  # the client's cost stays out of the server's measure
        return self.frame(1, 4, stream, block) + self.frame(0, 1, stream, self.message)

    @staticmethod
    def finished_calls(data: bytes) -> int:
        """How many calls `data` ends (trailers: HEADERS frames with END_STREAM)."""
        count, at = 0, 0
        while at + 9 <= len(data):
            length = int.from_bytes(data[at : at + 3], "big")
            if data[at + 3] == 1 and data[at + 4] & 1:
                count += 1
            at += 9 + length
        return count


class MemoryTransport(asyncio.Transport):
    """A transport whose writes go to a function."""

    def __init__(self, on_write: Callable[[bytes], None]) -> None:
        super().__init__()
        self.on_write = on_write

    def write(self, data: Any) -> None:
        self.on_write(bytes(data))

    def writelines(self, items: Any) -> None:
        self.on_write(b"".join(bytes(i) for i in items))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(
            name, default
        )

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def close(self) -> None:
        pass


class _HttpConfig:
    def __init__(self, app: HttpApp) -> None:
        self.app = app
        self.timeout_keep_alive = 300


class _ServerState:
    def __init__(self) -> None:
        self.connections: set[Any] = set()
        self.tasks: set[Any] = set()
        self.total_requests = 0


class ClosedLoop:
    """A request per starter in flight; each answer sends the next, until `total` answered."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.sent = 0
        self.answered = 0
        self.done = asyncio.get_running_loop().create_future()

    def start(self, starters: list[Callable[[], None]]) -> None:
        for send in starters:
            self.sent += 1
            send()

    def answers(self, count: int, send_next: Callable[[], None]) -> None:
        self.answered += count
        for _ in range(count):
            if self.sent < self.total:
                self.sent += 1
                asyncio.get_running_loop().call_soon(send_next)
        if self.answered >= self.total and not self.done.done():
            self.done.set_result(None)


def start_http(
    dataplane: DataPlane, concurrency: int, load: ClosedLoop
) -> list[Callable[[], None]]:
    request = http_request()
    config = _HttpConfig(HttpApp(dataplane))
    starters: list[Callable[[], None]] = []
    for _ in range(concurrency):
        connection = HttpConnection(config, _ServerState(), _loop=asyncio.get_running_loop())

        def send(connection: HttpConnection = connection) -> None:
            connection.data_received(request)

        def on_write(data: bytes, send: Callable[[], None] = send) -> None:
            load.answers(data.count(b"HTTP/1.1 "), send)

        connection.connection_made(MemoryTransport(on_write))
        starters.append(send)
    return starters


def start_grpc(
    dataplane: DataPlane, concurrency: int, load: ClosedLoop
) -> list[Callable[[], None]]:
    service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    calls = GrpcCalls(
        methods_of(InferenceServicer(dataplane, None), service),
        "none",
        None,
        GRPC_DEFAULT_MAX_INPUT_SIZE,
    )
    connection = Http2Connection(calls, KeepaliveSettings())
    client = GrpcClient()

    def send() -> None:
        connection.data_received(client.call())

    connection.connection_made(
        MemoryTransport(lambda d: load.answers(client.finished_calls(d), send))
    )
    connection.data_received(client.preface())
    return [send] * concurrency  # perf_analyzer multiplexes its calls on one connection


class CallCounter:
    """Python function calls (and calls of built-in functions) while it is on."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, frame: Any, event: str, arg: Any) -> None:
        if event == "call" or event == "c_call":
            self.calls += 1


async def measure(
    transport: str, concurrency: int, total: int, dataplane: DataPlane, options: argparse.Namespace
) -> dict[str, float]:
    warm = ClosedLoop(min(2000, total))
    connect = start_http if transport == "http" else start_grpc
    warm.start(connect(dataplane, concurrency, warm))
    await warm.done
    await asyncio.sleep(0.2)  # the warm-up's last answers leave
    before = _counts(dataplane)
    load = ClosedLoop(total)
    starters = connect(dataplane, concurrency, load)
    counter = CallCounter() if options.calls else None
    profile = cProfile.Profile() if options.profile else None
    usage, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    if counter is not None:
        sys.setprofile(counter)
        threading.setprofile(counter)
    if profile is not None:
        profile.enable()
    load.start(starters)
    await load.done
    if profile is not None:
        profile.disable()
        profile.dump_stats(f"{options.profile}.{transport}")
    if counter is not None:
        sys.setprofile(None)
        threading.setprofile(None)
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_SELF)
    user, system = after.ru_utime - usage.ru_utime, after.ru_stime - usage.ru_stime
    inferences, executions = (a - b for a, b in zip(_counts(dataplane), before, strict=True))
    result = {
        "cpu_us": (user + system) / total * 1e6,
        "system_us": system / total * 1e6,
        "wall_us": wall / total * 1e6,
        "per_execution": inferences / max(executions, 1),
    }
    if counter is not None:
        result["calls"] = counter.calls / total
    return result


def _counts(dataplane: DataPlane) -> tuple[int, int]:
    """Inferences of the model under load, executions of the identity model's worker."""
    served = dataplane.model_statistics(TARGET)[0]
    executed = dataplane.model_statistics(MODEL)[0]
    return int(served["inference_count"]), int(executed["execution_count"])


async def run(options: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as folder:
        version = Path(folder, MODEL, "1")
        version.mkdir(parents=True)
        (version.parent / "config.pbtxt").write_text(CONFIG)
        (version / "model.py").write_text(MODEL_PY)
        if TARGET != MODEL:
            ensemble = Path(folder, TARGET)
            Path(ensemble, "1").mkdir(parents=True)
            (ensemble / "config.pbtxt").write_text(ENSEMBLE_CONFIG)
        manager = ModelManager([Path(folder)])
        dataplane = DataPlane(manager)
        manager.host = ServerServices(dataplane, CustomMetrics())
        await manager.startup("none", [])
        try:
            transports = ["http", "grpc"] if options.transport == "both" else [options.transport]
            for transport in transports:
                result = await measure(
                    transport, options.concurrency, options.n, dataplane, options
                )
                line = (
                    f"{transport} c={options.concurrency}: server CPU {result['cpu_us']:.0f} us/inf "
                    f"({result['system_us']:.0f} of it in the kernel), "
                    f"wall {result['wall_us']:.0f} us/inf, {result['per_execution']:.2f} per execution"
                )
                if "calls" in result:
                    line += f", {result['calls']:.0f} Python calls/inf"
                print(line, flush=True)
        finally:
            await manager.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transport", choices=["http", "grpc", "both"], default="both")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("-n", type=int, default=20000, help="inferences measured")
    parser.add_argument("--calls", action="store_true", help="count Python calls per inference")
    parser.add_argument(
        "--profile", help="write a cProfile of the measured part to FILE.<transport>"
    )
    parser.add_argument(
        "--ensemble", action="store_true", help="load the ensemble of two identity steps"
    )
    options = parser.parse_args()
    if options.ensemble:
        global TARGET
        TARGET = ENSEMBLE
    try:
        import uvloop

        uvloop.run(run(options))
    except ImportError:
        asyncio.run(run(options))


if __name__ == "__main__":
    main()
