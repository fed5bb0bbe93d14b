"""The floor of a Python HTTP server on this machine, beside opserve, under perf_analyzer.

How fast can a Python process answer perf_analyzer's V2 inference requests at all? The floor
server here is the least a Python server can do per request: uvloop, httptools and orjson, one
protocol object per connection, the V2 binary extension's JSON header parsed and answered, the
input sent back as the output (a real identity, with no model, no worker, no validation, no
statistics beyond a count). It answers the few other routes perf_analyzer asks for (server and
model metadata, the config, readiness, the statistics' inference count) with what opserve
answers for the same model folder.

Against it, opserve serves ../shared/peers/identity (the `model.py` identity of
`python_identity_vs_triton.py`), A B A B in one run, over HTTP at concurrency 1, 4 and 8. The
table gives both throughputs, and each server's CPU per inference split into user and system
time: the floor's user time is what the interpreter costs per request before any of a server's
work; the difference is opserve's own path (protocol, V2 codec, validation, scheduling, the hop
to the worker and back, statistics) and its worker.

    python benchmarks/python_floor.py [--rounds 2] [--measurement-interval 3000] [--peers DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import python_identity_vs_triton as side_by_side  # noqa: E402

from tests.serving import free_port  # noqa: E402

CONCURRENCIES = (1, 4, 8)


# the floor server ------------------------------------------------------------------------------
class FloorConnection(asyncio.Protocol):
    """HTTP/1.1 keep-alive, one write per response; the least a V2 server can do."""

    canned: dict[bytes, bytes] = {}
    count = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        import httptools

        self.transport: Any = transport
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.header_length = b""
        self.body: list[bytes] = []

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"inference-header-content-length":
            self.header_length = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        import orjson

        url, body = self.url, b"".join(self.body)
        self.body = []
        if not url.endswith(b"/infer"):
            if url.endswith(b"/stats"):  # opserve's statistics, with the floor's counts
                payload = orjson.dumps(_counted(orjson.loads(self.canned[url])))
            else:
                payload = self.canned.get(url, b"")
            self._respond(b"application/json", payload)
            return
        length = int(self.header_length) if self.header_length else len(body)
        header = orjson.loads(body[:length])
        outputs = []
        offset = length
        for tensor in header["inputs"]:
            size = tensor["parameters"]["binary_data_size"]
            outputs.append(
                {
                    "name": "OUTPUT0",
                    "datatype": tensor["datatype"],
                    "shape": tensor["shape"],
                    "parameters": {"binary_data_size": size},
                }
            )
            offset += size
        answer = orjson.dumps({"model_name": "identity", "model_version": "1", "outputs": outputs})
        FloorConnection.count += header["inputs"][0]["shape"][0]
        self.header_length = b""
        self.transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
            b"inference-header-content-length: %d\r\ncontent-length: %d\r\n\r\n"
            % (len(answer), len(answer) + len(body) - length)
            + answer
            + body[length:]
        )

    def _respond(self, content_type: bytes, payload: bytes) -> None:
        self.transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n"
            % (content_type, len(payload))
            + payload
        )


def _counted(stats: Any) -> Any:
    """opserve's statistics after one inference, every count set to the floor's (perf_analyzer
    finds the model's version by its counts growing), each duration as if every inference took
    that one's time."""
    if isinstance(stats, list):
        return [_counted(item) for item in stats]
    if not isinstance(stats, dict):
        return stats
    counted = {key: _counted(value) for key, value in stats.items()}
    for key in ("count", "inference_count", "execution_count"):
        if key in counted:
            counted[key] = FloorConnection.count
    if "ns" in counted:
        counted["ns"] = stats["ns"] * FloorConnection.count
    if "last_inference" in counted:
        counted["last_inference"] = int(time.time() * 1000)
    return counted


def serve_floor(port: int, canned: Path) -> None:
    import uvloop

    FloorConnection.canned = {
        key.encode(): value.encode() for key, value in json.loads(canned.read_text()).items()
    }

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(FloorConnection, "127.0.0.1", port)
        await server.serve_forever()

    uvloop.run(main())


# the run ---------------------------------------------------------------------------------------
def capture_routes(http: str) -> dict[str, str]:
    """What opserve answers on the routes perf_analyzer reads, for the floor to answer alike
    (its statistics after one inference)."""
    import numpy as np
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(http)
    tensor = httpclient.InferInput("INPUT0", [1, 16], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 16), np.float32))
    client.infer("identity", [tensor])
    client.close()
    routes = {}
    for path in (
        "/v2",
        "/v2/models/identity",
        "/v2/models/identity/config",
        "/v2/models/identity/stats",
    ):
        with urllib.request.urlopen(f"http://{http}{path}", timeout=10) as reply:
            routes[path] = reply.read().decode()
    for path in ("/v2/health/ready", "/v2/health/live", "/v2/models/identity/ready"):
        routes[path] = ""
    return routes


def measure(
    name: str,
    endpoints: side_by_side.Endpoints,
    args: argparse.Namespace,
    workdir: Path,
    results: dict[tuple[str, int], list[tuple[float, float, float]]],
) -> None:
    for concurrency in CONCURRENCIES:
        before = (
            side_by_side.tree_cpu_split(endpoints.pid),
            side_by_side.inference_count(endpoints.http),
        )
        measurement = side_by_side.perf_analyzer(
            args.peers, endpoints, "http", concurrency, args, workdir
        )
        after = (
            side_by_side.tree_cpu_split(endpoints.pid),
            side_by_side.inference_count(endpoints.http),
        )
        count = max(after[1] - before[1], 1)
        user = (after[0][0] - before[0][0]) / count * 1e6
        system = (after[0][1] - before[0][1]) / count * 1e6
        results.setdefault((name, concurrency), []).append((measurement.infer_per_s, user, system))
        print(
            f"  {name:7} c={concurrency}: {measurement.infer_per_s:8,.0f} infer/s, "
            f"CPU {user:4.0f} user + {system:4.0f} system µs/inference",
            file=sys.stderr,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--measurement-interval", type=int, default=3000)
    parser.add_argument("--peers", type=Path, default=Path("/tmp/peers"))
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "ROUTES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_floor(int(args.serve[0]), Path(args.serve[1]))
        return 0
    args.shape, args.stability_percentage, args.max_trials = side_by_side.SHAPE, 100, 3
    args.shared_memory = "none"
    side_by_side.ensure_triton(args.peers)  # perf_analyzer comes with it
    results: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="opserve-floor-") as scratch:
        workdir = Path(scratch)
        repository = workdir / "models"
        side_by_side.prepare_repository(repository)
        routes = workdir / "routes.json"
        for round_number in range(1, args.rounds + 1):
            print(f"round {round_number}", file=sys.stderr)
            log = workdir / "opserve.log"
            with side_by_side.running_opserve(repository, log, 120) as endpoints:
                if not routes.exists():
                    routes.write_text(json.dumps(capture_routes(endpoints.http)))
                measure("opserve", endpoints, args, workdir, results)
            port = free_port()
            floor = subprocess.Popen([sys.executable, __file__, "--serve", str(port), str(routes)])
            try:
                deadline = time.monotonic() + 30
                while not side_by_side.answers_200(f"http://127.0.0.1:{port}/v2/health/ready"):
                    if time.monotonic() > deadline or floor.poll() is not None:
                        raise SystemExit("the floor server did not start")
                    time.sleep(0.1)
                endpoints = side_by_side.Endpoints(f"127.0.0.1:{port}", "", floor.pid)
                measure("floor", endpoints, args, workdir, results)
            finally:
                side_by_side.stop(floor)
    print(
        "| concurrency | floor infer/s | opserve infer/s | opserve / floor | "
        "floor CPU µs/inf (user + sys) | opserve CPU µs/inf (user + sys) |"
    )
    print("|---|---|---|---|---|---|")
    for concurrency in CONCURRENCIES:
        row = []
        for name in ("floor", "opserve"):
            cells = results.get((name, concurrency), [])
            row.append(tuple(statistics.median(c[i] for c in cells) for i in range(3)))
        (f_rate, f_user, f_sys), (o_rate, o_user, o_sys) = row
        print(
            f"| {concurrency} | {f_rate:,.0f} | {o_rate:,.0f} | {o_rate / f_rate:.2f}× | "
            f"{f_user:.0f} + {f_sys:.0f} | {o_user:.0f} + {o_sys:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
