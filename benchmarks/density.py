"""Density: many small models in one repository, with and without shared workers.

Writes N small ONNX models (a dense layer 16x16 + ReLU, each with weights of its own) and M
TorchScript models (the same layer, scripted) into a temporary repository, starts
`opserve serve` on it (`--shared-workers` unless `--no-share`), and reports:

- start-up: seconds from starting the server to `/v2/health/ready` answering 200 (strict
  readiness: every model READY);
- memory of the server and all its workers (every process under the server, from /proc): the
  sum of RSS, and the sum of PSS (`/proc/PID/smaps_rollup`: shared pages counted once, split
  between the processes that map them);
- that every model answers one request (tritonclient, HTTP), checked against numpy.

    python benchmarks/density.py --onnx 1000 --torch 200 [--no-share] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.serving import free_port  # noqa: E402

WIDTH = 16


def weights(index: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(index)
    return (
        rng.standard_normal((WIDTH, WIDTH)).astype(np.float32),
        rng.standard_normal(WIDTH).astype(np.float32),
    )


def write_onnx_models(repository: Path, count: int) -> None:
    from onnx import TensorProto, helper, numpy_helper, save

    for index in range(count):
        w, b = weights(index)
        graph = helper.make_graph(
            [
                helper.make_node("MatMul", ["INPUT0", "W"], ["XW"]),
                helper.make_node("Add", ["XW", "B"], ["Y"]),
                helper.make_node("Relu", ["Y"], ["OUTPUT0"]),
            ],
            "dense",
            [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, [None, WIDTH])],
            [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, [None, WIDTH])],
            initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        folder = repository / f"onnx_{index:04d}"
        (folder / "1").mkdir(parents=True)
        (folder / "config.pbtxt").write_text('backend: "onnxruntime"\nmax_batch_size: 8\n')
        save(model, str(folder / "1" / "model.onnx"))


TORCH_CONFIG = f"""backend: "pytorch"
max_batch_size: 8
input {{ name: "INPUT__0" data_type: TYPE_FP32 dims: [ {WIDTH} ] }}
output {{ name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ {WIDTH} ] }}
"""


def write_torch_models(repository: Path, count: int) -> None:
    import torch

    class Dense(torch.nn.Module):
        def __init__(self, w: torch.Tensor, b: torch.Tensor) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(w, requires_grad=False)
            self.b = torch.nn.Parameter(b, requires_grad=False)

        def forward(self, INPUT__0: torch.Tensor) -> torch.Tensor:
            return torch.relu(INPUT__0 @ self.w + self.b)

    for index in range(count):
        w, b = weights(100_000 + index)
        folder = repository / f"torch_{index:04d}"
        (folder / "1").mkdir(parents=True)
        (folder / "config.pbtxt").write_text(TORCH_CONFIG)
        module = torch.jit.script(Dense(torch.from_numpy(w), torch.from_numpy(b)))
        torch.jit.save(module, str(folder / "1" / "model.pt"))


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            text = Path(f"/proc/{current}/task/{current}/children").read_text()
        except OSError:
            continue
        todo += [int(p) for p in text.split()]
    return found


def memory(pid: int) -> tuple[int, int, int]:
    """RSS and PSS (bytes) of `pid` and every process under it, and how many processes."""
    rss = pss = 0
    processes = descendants(pid)
    for process in processes:
        try:
            for line in Path(f"/proc/{process}/smaps_rollup").read_text().splitlines():
                key, _, value = line.partition(":")
                if key == "Rss":
                    rss += int(value.split()[0]) * 1024
                elif key == "Pss":
                    pss += int(value.split()[0]) * 1024
        except OSError:
            continue
    return rss, pss, len(processes)


def wait_ready(port: int, server: subprocess.Popen[bytes], timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2):
                return time.monotonic() - started
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    raise RuntimeError(f"not ready after {timeout} s")


def check_answers(port: int, onnx: int, torch: int) -> int:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=60)
    x = np.linspace(-1, 1, 2 * WIDTH, dtype=np.float32).reshape(2, WIDTH)
    names = [(f"onnx_{i:04d}", "INPUT0", "OUTPUT0", i) for i in range(onnx)]
    names += [(f"torch_{i:04d}", "INPUT__0", "OUTPUT__0", 100_000 + i) for i in range(torch)]
    answered = 0
    for model, input_name, output_name, seed in names:
        tensor = httpclient.InferInput(input_name, list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        output = client.infer(model, [tensor]).as_numpy(output_name)
        w, b = weights(seed)
        if not np.allclose(output, np.maximum(x @ w + b, 0), atol=1e-4):
            raise RuntimeError(f"model {model} answered wrongly")
        answered += 1
    return answered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx", type=int, default=1000)
    parser.add_argument("--torch", type=int, default=200)
    parser.add_argument("--no-share", action="store_true", help="without --shared-workers")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="opserve-density-"))
    repository = work / "repository"
    try:
        write_onnx_models(repository, args.onnx)
        write_torch_models(repository, args.torch)
        port = free_port()
        command = [
            sys.executable,
            "-m",
            "opserve",
            "serve",
            "--model-repository",
            str(repository),
            "--http-address=127.0.0.1",
            f"--http-port={port}",
            f"--grpc-port={free_port()}",
            "--grpc-address=127.0.0.1",
            f"--metrics-port={free_port()}",
            "--metrics-address=127.0.0.1",
            "--log-verbose=0",
            "--startup-wait-secs=0",  # ports open at once: readiness is what is timed
            "--max-instances-total=100000",
        ]
        if not args.no_share:
            command.append("--shared-workers")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(work / "server.log", "wb") as log:
            server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                startup = wait_ready(port, server, args.timeout)
                rss, pss, processes = memory(server.pid)
                answered = check_answers(port, args.onnx, args.torch)
                rss_after, pss_after, _ = memory(server.pid)
            finally:
                server.terminate()
                server.wait(60)
        result = {
            "machine": f"{os.cpu_count()} cores, "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
            f"{platform.processor() or platform.machine()}",
            "shared_workers": not args.no_share,
            "onnx_models": args.onnx,
            "torch_models": args.torch,
            "processes": processes,
            "startup_to_ready_s": round(startup, 1),
            "rss_gib": round(rss / 2**30, 2),
            "pss_gib": round(pss / 2**30, 2),
            "rss_gib_after_requests": round(rss_after / 2**30, 2),
            "pss_gib_after_requests": round(pss_after / 2**30, 2),
            "models_answering": answered,
        }
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    except Exception:
        print(f"server log: {work / 'server.log'}", file=sys.stderr)
        raise
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
