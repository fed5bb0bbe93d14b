"""Throughput of one model through Ray Serve's ingress (`opserve.ray`) with one and with two
replicas, against opserve alone serving the same folder, in one run on one machine.

The model: the test suite's custom-op model (`AddOne` from its own ONNX Runtime library, FP32
[-1, 4], `max_batch_size: 4`), with `instance_group [ { count: 2 } ]`: opserve alone runs two
instances; through Serve each replica hosts one.

Load: perf_analyzer (Triton's C++ load tool, closed loop) over V2 HTTP, batch 1, at the given
concurrencies, against opserve's HTTP port and then Serve's (one local Ray cluster, loopback, no
dashboard; the application deployed with 1 replica, then again with 2). Serve's access log is
off (`logging_config`), as a deployment under load would have it. Each cell is one perf_analyzer
run; the table gives infer/s, p50 latency, and the ratio to opserve alone at that concurrency.
The load tool, Ray's processes and the servers share the machine's cores: on a 2-core machine,
two replicas cannot use more CPU than one, so the figures show the cost of Serve's hops more
than any gain of scale.

    python benchmarks/ray_serve_throughput.py [--concurrency 1,8] [--measurement-interval 3000]
        [--perf-analyzer PATH] [--json results.json]

Needs the `ray` extra (pip install 'opserve[ray]') and perf_analyzer
(scripts/install-perf-analyzer puts it in .venv-perf-analyzer).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import models  # noqa: E402
from tests.conftest import custom_op_config  # noqa: E402
from tests.oplibs import build  # noqa: E402
from tests.serving import RunningServer, free_port  # noqa: E402

MODEL = "add_one"
APP = "opserve"


def write_repository(root: Path) -> Path:
    repo = root / "repository"
    config = custom_op_config(MODEL, "libmy_ops.so") + "instance_group [ { count: 2 } ]\n"
    folder = models.write_model(repo, MODEL, models.custom_op(), config)
    build.copy_to(build.onnxruntime_my_ops(), folder / "libmy_ops.so")
    return repo


def perf_analyzer(tool: Path, url: str, concurrency: int, interval_ms: int, workdir: Path) -> dict:
    report = workdir / f"perf-{free_port()}.csv"
    command = [
        str(tool),
        "-m",
        MODEL,
        "-i",
        "http",
        "-u",
        url,
        "--shape",
        "INPUT0:4",
        "--concurrency-range",
        f"{concurrency}:{concurrency}",
        "--measurement-interval",
        str(interval_ms),
        "--stability-percentage",
        "200",  # generous: a shared, noisy machine
        "--max-trials",
        "4",
        "-f",
        str(report),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    rows = list(csv.DictReader(report.open())) if report.exists() else []
    if result.returncode != 0 or len(rows) != 1:
        raise RuntimeError(f"perf_analyzer failed: {result.stdout[-2000:]}{result.stderr[-2000:]}")
    row = rows[0]
    return {"infer_per_s": float(row["Inferences/Second"]), "p50_us": float(row["p50 latency"])}


def wait_ready(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{url}/v2/models/{MODEL}/ready", timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not become ready in {timeout_s:g} s")


def measure(tool: Path, url: str, args: argparse.Namespace, workdir: Path) -> dict[int, dict]:
    wait_ready(url)
    return {
        c: perf_analyzer(tool, url, c, args.measurement_interval, workdir) for c in args.concurrency
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,8", help="comma-separated (default 1,8)")
    parser.add_argument("--measurement-interval", type=int, default=3000, help="ms per window")
    default_tool = ROOT / ".venv-perf-analyzer" / "bin" / "perf_analyzer"
    if not default_tool.exists():
        default_tool = Path("/tmp/peers/perf_analyzer")
    parser.add_argument("--perf-analyzer", type=Path, default=default_tool)
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if not args.perf_analyzer.exists():
        print(
            f"no perf_analyzer at {args.perf_analyzer}: scripts/install-perf-analyzer",
            file=sys.stderr,
        )
        return 1
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    from ray import serve

    from opserve.ray import app

    results: dict[str, dict[int, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        repo = write_repository(workdir)
        with RunningServer([repo]) as server:
            results["opserve alone (2 instances)"] = measure(
                args.perf_analyzer, server.url, args, workdir
            )
        port = free_port()
        ray.init(
            num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False
        )
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            quiet = {"logging_config": {"log_level": "WARNING", "enable_access_log": False}}
            for replicas in (1, 2):
                options = {MODEL: {**quiet, "num_replicas": replicas}, "opserve-ingress": quiet}
                serve.run(
                    app({"model_repository": str(repo), "options": options}),
                    name=APP,
                    route_prefix="/",
                )
                label = f"Ray Serve, {replicas} replica{'s' if replicas > 1 else ''}"
                results[label] = measure(args.perf_analyzer, f"127.0.0.1:{port}", args, workdir)
                serve.delete(APP)
        finally:
            ray.shutdown()
    base = results["opserve alone (2 instances)"]
    print(
        f"\n{MODEL}, V2 HTTP, batch 1; {os.cpu_count()} cores, {platform.processor() or platform.machine()}"
    )
    print(
        "| server | "
        + " | ".join(f"c={c} infer/s (ratio) | c={c} p50 ms" for c in args.concurrency)
        + " |"
    )
    print("|---|" + "---|---|" * len(args.concurrency))
    for label, cells in results.items():
        row = [
            f"{cells[c]['infer_per_s']:.0f} ({cells[c]['infer_per_s'] / base[c]['infer_per_s']:.2f}x) | "
            f"{cells[c]['p50_us'] / 1000:.1f}"
            for c in args.concurrency
        ]
        print(f"| {label} | " + " | ".join(row) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
