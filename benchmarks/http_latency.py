"""Throughput and latency of a tiny model over HTTP: opserve beside baselines in the same run.

Baselines measured in the same run (these machines are shared and noisy, so compare ratios):
- raw in-process `onnxruntime` `session.run` (what the model itself costs);
- MLServer, in its own virtual environment (created by this script on first use), serving the same
  model with an onnxruntime runtime (`mlserver_runtime.py`) and its default settings (one worker
  process).

The same identity (FP32 [1, 16]) is also served as a TorchScript model and a SavedModel, next to
the in-process framework call.

Load: closed loop, `tritonclient.http`, one client process per concurrent request; and, where
scripts/install-perf-analyzer has installed it, Triton's own C++ load tool `perf_analyzer`. MLServer does not implement the binary tensor extension, so the like-for-like comparison is
JSON; opserve's binary rows are what `tritonclient` sends by default.

    python benchmarks/http_latency.py [--seconds 5] [--json results.json]

MLServer's virtual environment is benchmarks/.venv-mlserver, or $MLSERVER_VENV.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.serving import RunningServer, free_port  # noqa: E402

MLSERVER_VENV = Path(os.environ.get("MLSERVER_VENV", ROOT / "benchmarks" / ".venv-mlserver"))
# uvloop 0.22+ breaks MLServer 1.7 workers ("There is no current event loop")
MLSERVER_REQUIREMENTS = ["mlserver==1.7.1", "uvloop<0.22", "onnxruntime"]


def write_model(directory: Path) -> Path:
    from onnx import TensorProto, helper, save

    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        "identity",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, [None, 16])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, [None, 16])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = directory / "model.onnx"
    save(model, str(path))
    return path


def write_add_one_models(repository: Path) -> None:
    """x + 1 twice: with our custom op my_ops::AddOne (its library in the model's folder, so the
    model gets inspected and isolated) and with ONNX's own Add, for the cost of isolation."""
    from onnx import TensorProto, helper, numpy_helper, save

    from tests.oplibs import build

    x = helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, [None, 16])
    y = helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, [None, 16])
    one = numpy_helper.from_array(np.ones(1, dtype=np.float32), "ONE")
    builtin = helper.make_graph(
        [helper.make_node("Add", ["INPUT0", "ONE"], ["OUTPUT0"])], "g", [x], [y], [one]
    )
    custom = helper.make_graph(
        [helper.make_node("AddOne", ["INPUT0"], ["OUTPUT0"], domain="my_ops")], "g", [x], [y]
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("my_ops", 1)]
    for name, graph in (("add_one_builtin", builtin), ("add_one_custom", custom)):
        (repository / name / "1").mkdir(parents=True)
        save(
            helper.make_model(graph, opset_imports=opsets, ir_version=8),
            str(repository / name / "1" / "model.onnx"),
        )
    shutil.copyfile(build.onnxruntime_my_ops(), repository / "add_one_custom" / "libmy_ops.so")
    (repository / "add_one_custom" / "config.pbtxt").write_text(
        'backend: "onnxruntime"\nmodel_operations { op_library_filename: "libmy_ops.so" }\n'
    )


CHAIN_LENGTH = 4000


def write_chain_models(repository: Path) -> None:
    """A model whose cost is per execution, not per row: a chain of small Adds on [batch, 16]
    (like a model of many small kernels). Once without batching, once with dynamic batching."""
    from onnx import TensorProto, helper, numpy_helper, save

    step = numpy_helper.from_array(np.full(1, 0.001, dtype=np.float32), "STEP")
    nodes, previous = [], "INPUT0"
    for index in range(CHAIN_LENGTH):
        output = "OUTPUT0" if index == CHAIN_LENGTH - 1 else f"t{index}"
        nodes.append(helper.make_node("Add", [previous, "STEP"], [output]))
        previous = output
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, [None, 16])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, [None, 16])],
        [step],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    for name, scheduling in (
        ("chain", ""),
        ("chain_batched", "dynamic_batching { max_queue_delay_microseconds: 1000 }\n"),
    ):
        (repository / name / "1").mkdir(parents=True)
        save(model, str(repository / name / "1" / "model.onnx"))
        (repository / name / "config.pbtxt").write_text(
            f'backend: "onnxruntime"\nmax_batch_size: 32\n{scheduling}'
        )


def write_torchscript(directory: Path) -> Path:
    import torch

    class Identity(torch.nn.Module):
        def forward(self, INPUT0: torch.Tensor) -> torch.Tensor:
            return INPUT0.clone()

    path = directory / "model.pt"
    torch.jit.save(torch.jit.script(Identity()), str(path))
    (directory.parent / "config.pbtxt").write_text(
        'platform: "pytorch_libtorch"\nmax_batch_size: 8\n'
        'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]\n'
    )
    return path


def write_savedmodel(directory: Path) -> Path:
    import tensorflow as tf

    class Identity(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 16], tf.float32, name="INPUT0")])
        def serve(self, INPUT0):
            return {"OUTPUT0": tf.identity(INPUT0)}

    module = Identity()
    path = directory / "model.savedmodel"
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return path


def bench_in_process(call, seconds: float) -> dict[str, float]:
    latencies = []
    start = time.perf_counter()
    while (now := time.perf_counter()) - start < seconds:
        call()
        latencies.append(time.perf_counter() - now)
    return summarize(latencies, time.perf_counter() - start)


def bench_raw_torch(model: Path, seconds: float) -> dict[str, float]:
    import torch

    module = torch.jit.load(str(model))
    x = torch.rand(1, 16)

    def call() -> None:
        with torch.inference_mode():
            module(x).numpy()

    return bench_in_process(call, seconds)


def bench_raw_tensorflow(model: Path, seconds: float) -> dict[str, float]:
    import tensorflow as tf

    function = tf.saved_model.load(str(model)).signatures["serving_default"]
    x = np.random.rand(1, 16).astype(np.float32)
    return bench_in_process(lambda: function(INPUT0=tf.constant(x))["OUTPUT0"].numpy(), seconds)


def summarize(latencies_s: list[float], elapsed_s: float) -> dict[str, float]:
    latencies = np.array(latencies_s) * 1e6
    return {
        "requests_per_s": len(latencies) / elapsed_s,
        "p50_us": float(np.percentile(latencies, 50)),
        "p99_us": float(np.percentile(latencies, 99)),
        "count": len(latencies),
    }


def bench_raw_onnxruntime(model: Path, seconds: float) -> dict[str, float]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model), options)
    feed = {"INPUT0": np.random.rand(1, 16).astype(np.float32)}
    return bench_in_process(lambda: session.run(None, feed), seconds)


def _client_loop(
    url: str,
    model: str,
    binary: bool,
    seconds: float,
    start_at: float,
    queue,
    protocol: str = "http",
) -> None:
    data = np.random.rand(1, 16).astype(np.float32)
    if protocol == "grpc":
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(url)
        tensor = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
        tensor.set_data_from_numpy(data)
        outputs = [grpcclient.InferRequestedOutput("OUTPUT0")]
    else:
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(url, connection_timeout=60, network_timeout=60)
        tensor = httpclient.InferInput("INPUT0", [1, 16], "FP32")
        tensor.set_data_from_numpy(data, binary_data=binary)
        outputs = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)]
    for _ in range(20):  # warm up the connection
        client.infer(model, [tensor], outputs=outputs)
    while time.time() < start_at:
        time.sleep(0.001)
    latencies = []
    end = start_at + seconds
    while (now := time.perf_counter()) and time.time() < end:
        client.infer(model, [tensor], outputs=outputs)
        latencies.append(time.perf_counter() - now)
    queue.put(latencies)


def bench_http(
    url: str, model: str, binary: bool, concurrency: int, seconds: float, protocol: str = "http"
) -> dict[str, float]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    start_at = time.time() + max(3.0, 0.5 * concurrency)  # every client started and warm
    clients = [
        context.Process(
            target=_client_loop, args=(url, model, binary, seconds, start_at, queue, protocol)
        )
        for _ in range(concurrency)
    ]
    for process in clients:
        process.start()
    latencies: list[float] = []
    for _ in clients:
        latencies += queue.get(timeout=seconds + 120)
    for process in clients:
        process.join()
    return summarize(latencies, seconds)


PERF_ANALYZER = ROOT / ".venv-perf-analyzer" / "bin" / "perf_analyzer"


def bench_perf_analyzer(
    url: str, model: str, protocol: str, concurrency: int, seconds: float
) -> dict[str, float]:
    """Triton's own C++ load tool (scripts/install-perf-analyzer), closed loop at `concurrency`."""
    import csv

    (cuda,) = (ROOT / ".venv-perf-analyzer").glob(
        "lib/python3*/site-packages/nvidia/cuda_runtime/lib"
    )
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.csv"
        subprocess.run(
            [
                str(PERF_ANALYZER),
                "-m",
                model,
                "-u",
                url,
                "-i",
                protocol,
                "--concurrency-range",
                str(concurrency),
                "--measurement-interval",
                str(int(seconds * 1000)),
                "-f",
                str(report),
            ],
            check=True,
            capture_output=True,
            env={**os.environ, "LD_LIBRARY_PATH": str(cuda)},
        )
        (row,) = csv.DictReader(report.open())
    return {
        "requests_per_s": float(row["Inferences/Second"]),
        "p50_us": float(row["p50 latency"]),
        "p99_us": float(row["p99 latency"]),
        "count": 0,
    }


def ensure_mlserver() -> Path:
    python = MLSERVER_VENV / "bin" / "python"
    if not (MLSERVER_VENV / "bin" / "mlserver").exists():
        subprocess.run([sys.executable, "-m", "venv", str(MLSERVER_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *MLSERVER_REQUIREMENTS], check=True
        )
    return MLSERVER_VENV / "bin" / "mlserver"


class RunningMLServer:
    def __init__(self, model: Path, workdir: Path) -> None:
        self.port = free_port()
        self.folder = workdir / "mlserver"
        model_dir = self.folder / "identity"
        model_dir.mkdir(parents=True)
        shutil.copyfile(model, model_dir / "model.onnx")
        shutil.copyfile(
            ROOT / "benchmarks" / "mlserver_runtime.py", self.folder / "mlserver_runtime.py"
        )
        (model_dir / "model-settings.json").write_text(
            json.dumps(
                {
                    "name": "identity",
                    "implementation": "mlserver_runtime.OnnxRuntimeModel",
                    "parameters": {"uri": str(model_dir / "model.onnx")},
                }
            )
        )
        (self.folder / "settings.json").write_text(
            json.dumps(
                {
                    "http_port": self.port,
                    "grpc_port": free_port(),
                    "metrics_port": free_port(),
                    "host": "127.0.0.1",
                }
            )
        )

    def __enter__(self) -> RunningMLServer:
        executable = ensure_mlserver()
        self.log = open(self.folder / "mlserver.log", "wb")
        self.process = subprocess.Popen(
            [str(executable), "start", str(self.folder)],
            cwd=self.folder,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.port}/v2/models/identity/ready", timeout=1
                ):
                    return self
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError((self.folder / "mlserver.log").read_text()) from None
                time.sleep(0.2)
        raise RuntimeError("MLServer did not become ready")

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per row")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--skip-mlserver", action="store_true")
    parser.add_argument(
        "--skip-custom-op", action="store_true", help="skip the custom-op (isolation cost) rows"
    )
    parser.add_argument("--skip-grpc", action="store_true", help="skip the gRPC rows")
    parser.add_argument(
        "--batching-concurrency",
        type=int,
        default=32,
        help="concurrency of the dynamic-batching rows (0 skips them)",
    )
    parser.add_argument(
        "--frameworks",
        nargs="*",
        default=["pytorch", "tensorflow"],
        help="also measure the same identity as a TorchScript model and a SavedModel",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    rows: list[tuple[str, str, int, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        repository = workdir / "repository"
        (repository / "identity" / "1").mkdir(parents=True)
        model = write_model(repository / "identity" / "1")

        rows.append(
            ("onnxruntime in-process", "session.run", 1, bench_raw_onnxruntime(model, args.seconds))
        )
        if not args.skip_custom_op:
            write_add_one_models(repository)
        if args.batching_concurrency:
            write_chain_models(repository)
        framework_models = {}
        if "pytorch" in args.frameworks:
            (repository / "identity_torch" / "1").mkdir(parents=True)
            framework_models["identity_torch"] = write_torchscript(
                repository / "identity_torch" / "1"
            )
            result = bench_raw_torch(framework_models["identity_torch"], args.seconds)
            rows.append(("torch in-process", "TorchScript call", 1, result))
        if "tensorflow" in args.frameworks:
            (repository / "identity_tf" / "1").mkdir(parents=True)
            framework_models["identity_tf"] = write_savedmodel(repository / "identity_tf" / "1")
            result = bench_raw_tensorflow(framework_models["identity_tf"], args.seconds)
            rows.append(("tensorflow in-process", "SavedModel signature", 1, result))
        with RunningServer([repository], log_path=workdir / "opserve.log") as server:
            for concurrency in args.concurrency:
                for binary in (True, False):
                    result = bench_http(server.url, "identity", binary, concurrency, args.seconds)
                    rows.append(
                        ("opserve", "HTTP binary" if binary else "HTTP JSON", concurrency, result)
                    )
            if PERF_ANALYZER.exists():
                for protocol, url in (("http", server.url), ("grpc", server.grpc_url)):
                    for concurrency in args.concurrency:
                        result = bench_perf_analyzer(
                            url, "identity", protocol, concurrency, args.seconds
                        )
                        rows.append(("opserve, perf_analyzer load", protocol, concurrency, result))
            if not args.skip_grpc:
                for concurrency in args.concurrency:
                    result = bench_http(
                        server.grpc_url, "identity", True, concurrency, args.seconds, "grpc"
                    )
                    rows.append(("opserve", "gRPC", concurrency, result))
            if args.batching_concurrency:
                for name, label in (
                    ("chain", "opserve 4000-Add chain, no batching"),
                    ("chain_batched", "opserve 4000-Add chain, dynamic batching"),
                ):
                    result = bench_http(
                        server.url, name, True, args.batching_concurrency, args.seconds
                    )
                    rows.append((label, "HTTP binary", args.batching_concurrency, result))
            if not args.skip_custom_op:
                for name, label in (
                    ("add_one_builtin", "opserve x+1, ONNX Add"),
                    ("add_one_custom", "opserve x+1, custom op (own library)"),
                ):
                    for concurrency in args.concurrency:
                        result = bench_http(server.url, name, True, concurrency, args.seconds)
                        rows.append((label, "HTTP binary", concurrency, result))
            for name, label in (
                ("identity_torch", "opserve TorchScript"),
                ("identity_tf", "opserve SavedModel"),
            ):
                if name in framework_models:
                    for concurrency in args.concurrency:
                        result = bench_http(server.url, name, True, concurrency, args.seconds)
                        rows.append((label, "HTTP binary", concurrency, result))
        if not args.skip_mlserver:
            with RunningMLServer(model, workdir) as mlserver:
                for concurrency in args.concurrency:
                    result = bench_http(
                        f"127.0.0.1:{mlserver.port}", "identity", False, concurrency, args.seconds
                    )
                    rows.append(
                        ("MLServer 1.7 (1 worker process)", "HTTP JSON", concurrency, result)
                    )

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print("| server | transport | concurrency | requests/s | p50 µs | p99 µs |")
    print("|---|---|---|---|---|---|")
    for server, transport, concurrency, result in rows:
        print(
            f"| {server} | {transport} | {concurrency} | {result['requests_per_s']:,.0f} | "
            f"{result['p50_us']:,.0f} | {result['p99_us']:,.0f} |"
        )
    by_key = {(s, t, c): r for s, t, c, r in rows}
    for concurrency in args.concurrency:
        ml = by_key.get(("MLServer 1.7 (1 worker process)", "HTTP JSON", concurrency))
        if ml:
            for transport in ("HTTP JSON", "HTTP binary"):
                ours = by_key[("opserve", transport, concurrency)]
                print(
                    f"c={concurrency} opserve {transport} / MLServer: throughput "
                    f"{ours['requests_per_s'] / ml['requests_per_s']:.2f}x, p50 "
                    f"{ours['p50_us'] / ml['p50_us']:.2f}x"
                )
    plain = by_key.get(
        ("opserve 4000-Add chain, no batching", "HTTP binary", args.batching_concurrency)
    )
    batched = by_key.get(
        ("opserve 4000-Add chain, dynamic batching", "HTTP binary", args.batching_concurrency)
    )
    if plain and batched:
        print(
            f"c={args.batching_concurrency} dynamic batching / no batching: throughput "
            f"{batched['requests_per_s'] / plain['requests_per_s']:.2f}x"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                [{"server": s, "transport": t, "concurrency": c, **r} for s, t, c, r in rows],
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
