"""A Python-backend identity model (`model.py`): opserve against Triton 2.51 serving the same folder.

The model is ../shared/peers/identity (relative to the repository root): a `model.py` identity,
FP32 [-1], `max_batch_size: 64`, `dynamic_batching {}`. Both servers serve that very folder (through
a symlink in a temporary model repository, so that nothing else sits beside it).

Triton 2.51 (CPU, Python backend only) and perf_analyzer 2.51 come from
../shared/peers/setup-triton.sh, run by this script when DIR/tritonserver is missing (DIR is
--peers, /tmp/peers by default); Triton is started with ../shared/peers/start-triton.sh.

Load: Triton's own C++ load tool, perf_analyzer (closed loop), model `identity`, `--shape INPUT0:16`,
at concurrency 1, 4 and 8, over HTTP and over gRPC: six cells. Each cell is one perf_analyzer run
with a generous stability criterion and few trials, so that it ends in bounded time on a noisy
machine; its reported throughput and p50/p99 latency are taken from its CSV report.

Method: A B A B. Each round starts Triton, measures all six cells, stops it; then starts opserve
(`tests.serving.RunningServer`), measures the same cells, stops it. A server counts as up once
/v2/health/ready and /v2/models/identity/ready answer 200. Per cell, the table shows the median over
rounds for each server and the ratio opserve / Triton, and each server's CPU time per
inference (user and system time of its whole process tree over the cell's run, from /proc,
divided by the inferences its statistics counted): a figure other work on the machine barely
moves. These machines are shared and noisy, and the
load tool shares the cores with the server: compare ratios measured in one run, not absolute numbers.

    python benchmarks/python_identity_vs_triton.py [--rounds 2] [--measurement-interval 3000]
        [--json results.json] [--opserve-only | --triton-only] [--peers /tmp/peers]
        [--shared-memory system]

`--shared-memory system` measures the same cells with the tensors in system shared-memory
regions that perf_analyzer registers with the server (Triton's shared-memory extension).

A server that does not become ready is reported (with the end of its log) and skipped for the rest
of the run; the other server is still measured, and the script exits with status 1.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.serving import RunningServer, free_port  # noqa: E402

PEERS = ROOT.parent / "shared" / "peers"
MODEL_FOLDER = PEERS / "identity"
MODEL = "identity"
SHAPE = "INPUT0:16"
TRANSPORTS = ("http", "grpc")
CONCURRENCIES = (1, 4, 8)
SERVERS = ("Triton", "opserve")
_MIB = 262144  # FP32 elements in 1 MiB
# --suite: (shape, concurrencies, --shared-memory) per table
SUITES: dict[str, list[tuple[str, tuple[int, ...], str]]] = {
    "wire": [(SHAPE, CONCURRENCIES, "none")],
    "large": [
        (f"INPUT0:{mib * _MIB}", (1, 4), memory)
        for mib in (1, 16, 64)
        for memory in ("none", "system")
    ],
    "batching": [(SHAPE, (64,), "none")],
}
SUITES["all"] = SUITES["wire"] + SUITES["large"] + SUITES["batching"]
LOG_TAIL_LINES = 25


@dataclass(frozen=True)
class Endpoints:
    """Where a running server listens: host:port for HTTP and for gRPC."""

    http: str
    grpc: str
    pid: int  # the server's process: its tree (workers, Triton's stubs) is charged its CPU

    def url(self, transport: str) -> str:
        return self.http if transport == "http" else self.grpc


@dataclass(frozen=True)
class Measurement:
    infer_per_s: float
    p50_us: float
    p99_us: float
    # CPU time of the server's whole process tree per inference over the cell's run (user and
    # system): unlike throughput, barely moved by other work on the machine
    cpu_us: float


Cell = tuple[str, int]  # (transport, concurrency)
Results = dict[str, dict[Cell, list[Measurement]]]  # server -> cell -> one per round


class BenchmarkError(Exception):
    """A failure worth one clear message, not a traceback: a server or the load tool failed."""


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def answers_200(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def wait_ready(
    name: str, http: str, process: subprocess.Popen[bytes], log: Path, timeout: float
) -> None:
    """Until the server and the model are ready; a BenchmarkError if the server exits or times out."""
    urls = [f"http://{http}/v2/health/ready", f"http://{http}/v2/models/{MODEL}/ready"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchmarkError(
                f"{name} exited with status {process.returncode} before it was ready; "
                f"end of its log ({log}):\n{tail(log)}"
            )
        if all(answers_200(url) for url in urls):
            return
        time.sleep(0.2)
    raise BenchmarkError(
        f"{name} was not ready after {timeout:.0f}s ({' and '.join(urls)} did not both answer "
        f"200); end of its log ({log}):\n{tail(log)}"
    )


def stop(process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def ensure_triton(peers: Path) -> None:
    """Installs Triton and perf_analyzer into `peers` unless they are there already."""
    if (peers / "tritonserver").exists() and (peers / "perf_analyzer").exists():
        return
    print(f"installing Triton 2.51 and perf_analyzer into {peers} ...", file=sys.stderr)
    result = subprocess.run([str(PEERS / "setup-triton.sh"), str(peers)])
    if result.returncode != 0:
        raise BenchmarkError(f"setup-triton.sh {peers} failed with status {result.returncode}")


@contextmanager
def running_triton(repository: Path, peers: Path, log: Path, timeout: float) -> Iterator[Endpoints]:
    http, grpc, metrics = free_port(), free_port(), free_port()
    command = [str(PEERS / "start-triton.sh"), str(repository), str(http), str(grpc)]
    command += [str(metrics), str(peers)]
    with log.open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            endpoints = Endpoints(f"127.0.0.1:{http}", f"127.0.0.1:{grpc}", process.pid)
            wait_ready("Triton", endpoints.http, process, log, timeout)
            yield endpoints
        finally:
            stop(process)


@contextmanager
def running_opserve(
    repository: Path,
    log: Path,
    timeout: float,
    body_bytes: int = 0,
    flags: Sequence[str] = (),
    source: Path | None = None,
) -> Iterator[Endpoints]:
    """opserve on `repository`, with `flags` added to its command line; an HTTP body of
    `body_bytes` is accepted (Triton 2.51 has no limit; opserve's --http-max-input-size is 64 MiB
    by default, as later Tritons have). `source`: a checkout of opserve whose code the server
    and its workers run instead of this one's (run from there, and first on their path)."""
    started = time.monotonic()
    limit = max(body_bytes + (1 << 20), 64 << 20)
    server = RunningServer(
        [repository],
        [f"--http-max-input-size={limit}", *flags],
        env={"PYTHONPATH": str(source)} if source is not None else None,
        log_path=log,
        startup_timeout=timeout,
        cwd=source,
    )
    try:
        server.__enter__()
    except RuntimeError as exc:  # exited, or not live in time; the message carries the whole log
        reason = str(exc).splitlines()[0].rstrip(":")
        raise BenchmarkError(
            f"opserve did not start ({reason}); end of its log ({log}):\n{tail(log)}"
        ) from None
    try:
        assert server.process is not None
        remaining = max(timeout - (time.monotonic() - started), 1.0)
        wait_ready("opserve", server.url, server.process, log, remaining)
        yield Endpoints(server.url, server.grpc_url, server.process.pid)
    finally:
        server.__exit__(None, None, None)


def tree_cpu_split(root: int) -> tuple[float, float]:
    """User and system CPU seconds of `root` and every process below it (from /proc)."""
    parents: dict[int, int] = {}
    times: dict[int, tuple[float, float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        times[pid] = (int(fields[11]) / tick, int(fields[12]) / tick)
    user = system = 0.0
    for pid, (pid_user, pid_system) in times.items():
        ancestor = pid
        while ancestor not in (0, 1) and ancestor != root:
            ancestor = parents.get(ancestor, 0)
        if ancestor == root:
            user += pid_user
            system += pid_system
    return user, system


def tree_cpu_seconds(root: int) -> float:
    """User and system CPU seconds of `root` and every process below it, together."""
    return sum(tree_cpu_split(root))


def inference_count(http: str) -> int:
    """The model's inference count from the statistics extension (both servers have it)."""
    with urllib.request.urlopen(f"http://{http}/v2/models/{MODEL}/stats", timeout=10) as reply:
        stats = json.load(reply)["model_stats"]
    return sum(int(entry.get("inference_count", 0)) for entry in stats)


def shape_bytes(shape: str) -> int:
    """The bytes of an FP32 tensor of perf_analyzer's `--shape NAME:D1,D2,...`."""
    elements = 1
    for dim in shape.split(":", 1)[1].split(","):
        elements *= int(dim)
    return 4 * elements


def perf_analyzer(
    peers: Path,
    endpoints: Endpoints,
    transport: str,
    concurrency: int,
    args: argparse.Namespace,
    workdir: Path,
) -> Measurement:
    """One perf_analyzer run at one concurrency; its CSV report's single row, and the server's
    CPU per inference over the run."""
    url = endpoints.url(transport)
    report = workdir / f"perf-{transport}-{concurrency}.csv"
    report.unlink(missing_ok=True)
    command = [
        str(peers / "perf_analyzer"),
        "-m",
        MODEL,
        "-i",
        transport,
        "-u",
        url,
        "--shape",
        args.shape,
        "--concurrency-range",
        f"{concurrency}:{concurrency}",
        "--measurement-interval",
        str(args.measurement_interval),
        "--stability-percentage",
        str(args.stability_percentage),
        "--max-trials",
        str(args.max_trials),
        "-f",
        str(report),
        "--shared-memory",
        args.shared_memory,
    ]
    if args.shared_memory != "none":  # the output region must hold the output (FP32 identity)
        command += ["--output-shared-memory-size", str(shape_bytes(args.shape))]
    # at most max_trials windows, plus a generous margin for connecting and warming up
    limit = args.max_trials * args.measurement_interval / 1000 * 3 + 60
    cpu_before, count_before = tree_cpu_seconds(endpoints.pid), inference_count(endpoints.http)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        raise BenchmarkError(f"perf_analyzer ran past {limit:.0f}s: {' '.join(command)}") from None
    cpu = tree_cpu_seconds(endpoints.pid) - cpu_before
    count = inference_count(endpoints.http) - count_before
    rows = list(csv.DictReader(report.open())) if report.exists() else []
    if result.returncode != 0 or len(rows) != 1:
        output = "\n".join((result.stdout + result.stderr).splitlines()[-LOG_TAIL_LINES:])
        raise BenchmarkError(
            f"perf_analyzer failed (status {result.returncode}): {' '.join(command)}\n{output}"
        )
    (row,) = rows
    return Measurement(
        infer_per_s=float(row["Inferences/Second"]),
        p50_us=float(row["p50 latency"]),
        p99_us=float(row["p99 latency"]),
        cpu_us=cpu / max(count, 1) * 1e6,
    )


def measure_server(
    name: str,
    endpoints: Endpoints,
    peers: Path,
    args: argparse.Namespace,
    workdir: Path,
    results: Results,
) -> bool:
    """All six cells against one running server; False if any cell failed (reported, skipped)."""
    ok = True
    for transport in TRANSPORTS:
        for concurrency in args.concurrency:
            try:
                result = perf_analyzer(peers, endpoints, transport, concurrency, args, workdir)
            except BenchmarkError as exc:
                print(f"error: {name} {transport} c={concurrency}: {exc}", file=sys.stderr)
                ok = False
                continue
            results[name].setdefault((transport, concurrency), []).append(result)
            print(
                f"  {name:7} {transport:4} c={concurrency}: {result.infer_per_s:9,.0f} infer/s, "
                f"p50 {result.p50_us:7,.0f} µs, p99 {result.p99_us:7,.0f} µs, "
                f"server CPU {result.cpu_us:5,.0f} µs/inference",
                file=sys.stderr,
            )
    return ok


def run_rounds(
    servers: list[str], repository: Path, peers: Path, args: argparse.Namespace, workdir: Path
) -> tuple[Results, set[str], bool]:
    """A B A B; the results, the servers that were not ready, and whether any cell failed."""
    results: Results = {name: {} for name in SERVERS}
    failed: set[str] = set()  # not ready: skipped from then on
    cell_errors = False
    for round_index in range(args.rounds):
        for name in servers:
            if name in failed:
                continue
            print(f"round {round_index + 1}/{args.rounds}: {name}", file=sys.stderr)
            log = workdir / f"{name}-{round_index + 1}.log"
            server = (
                running_triton(repository, peers, log, args.startup_timeout)
                if name == "Triton"
                else running_opserve(
                    repository,
                    log,
                    args.startup_timeout,
                    shape_bytes(args.shape),
                    args.opserve_flag,
                )
            )
            try:
                with server as endpoints:
                    if not measure_server(name, endpoints, peers, args, workdir, results):
                        cell_errors = True
            except BenchmarkError as exc:
                print(f"error: {exc}", file=sys.stderr)
                print(f"error: skipping {name} from now on", file=sys.stderr)
                failed.add(name)
    return results, failed, cell_errors


def median(measurements: list[Measurement]) -> Measurement | None:
    if not measurements:
        return None
    return Measurement(
        infer_per_s=statistics.median(m.infer_per_s for m in measurements),
        p50_us=statistics.median(m.p50_us for m in measurements),
        p99_us=statistics.median(m.p99_us for m in measurements),
        cpu_us=statistics.median(m.cpu_us for m in measurements),
    )


def number(measurement: Measurement | None, field: str) -> str:
    return "—" if measurement is None else f"{getattr(measurement, field):,.0f}"


def report(results: Results, args: argparse.Namespace) -> list[dict[str, object]]:
    """Prints the Markdown table; returns the same rows (with every round) for --json."""
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; perf_analyzer, --shape {args.shape}, "
        f"--shared-memory {args.shared_memory}, "
        f"median of {args.rounds} round(s) A B A B"
    )
    print(
        "| transport | concurrency | Triton infer/s | opserve infer/s | opserve/Triton "
        "| Triton p50 µs | opserve p50 µs | Triton p99 µs | opserve p99 µs "
        "| Triton CPU µs/inf | opserve CPU µs/inf |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows: list[dict[str, object]] = []
    for transport in TRANSPORTS:
        for concurrency in args.concurrency:
            cell = (transport, concurrency)
            triton = median(results["Triton"].get(cell, []))
            ours = median(results["opserve"].get(cell, []))
            ratio = ours.infer_per_s / triton.infer_per_s if ours and triton else None
            print(
                f"| {'HTTP' if transport == 'http' else 'gRPC'} | {concurrency} "
                f"| {number(triton, 'infer_per_s')} | {number(ours, 'infer_per_s')} "
                f"| {'—' if ratio is None else f'{ratio:.2f}x'} "
                f"| {number(triton, 'p50_us')} | {number(ours, 'p50_us')} "
                f"| {number(triton, 'p99_us')} | {number(ours, 'p99_us')} "
                f"| {number(triton, 'cpu_us')} | {number(ours, 'cpu_us')} |"
            )
            rows.append(
                {
                    "transport": transport,
                    "concurrency": concurrency,
                    "triton": asdict(triton) if triton else None,
                    "opserve": asdict(ours) if ours else None,
                    "ratio_infer_per_s": ratio,
                    "rounds": {
                        name: [asdict(m) for m in results[name].get(cell, [])] for name in SERVERS
                    },
                }
            )
    return rows


def prepare_repository(repository: Path) -> None:
    """The model repository both servers serve: the identity model folder, linked."""
    repository.mkdir()
    (repository / MODEL).symlink_to(MODEL_FOLDER, target_is_directory=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2, help="A B rounds (default 2)")
    parser.add_argument(
        "--measurement-interval",
        type=int,
        default=3000,
        help="perf_analyzer measurement window, ms (default 3000)",
    )
    parser.add_argument(
        "--stability-percentage",
        type=float,
        default=50.0,
        help="perf_analyzer's stability criterion, percent (default 50: these machines are noisy)",
    )
    parser.add_argument(
        "--max-trials", type=int, default=5, help="perf_analyzer's windows per cell at most"
    )
    parser.add_argument(
        "--startup-timeout", type=float, default=120.0, help="seconds for a server to be ready"
    )
    parser.add_argument(
        "--peers",
        type=Path,
        default=Path("/tmp/peers"),
        help="where Triton and perf_analyzer are (installed there if missing)",
    )
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--opserve-only", action="store_true", help="measure opserve alone")
    only.add_argument("--triton-only", action="store_true", help="measure Triton alone")
    parser.add_argument(
        "--shared-memory",
        choices=("none", "system"),
        default="none",
        help="perf_analyzer's --shared-memory: tensors in the request and response (none, the "
        "default) or in system shared-memory regions it registers (system)",
    )
    parser.add_argument(
        "--shape",
        default=SHAPE,
        help=f"perf_analyzer's --shape (default {SHAPE}; INPUT0:262144 is 1 MiB of FP32)",
    )
    parser.add_argument(
        "--concurrency",
        type=lambda text: tuple(int(c) for c in text.split(",")),
        default=CONCURRENCIES,
        help="the concurrencies measured, comma-separated (default 1,4,8)",
    )
    parser.add_argument(
        "--suite",
        choices=sorted(SUITES),
        help="the cells of one of the performance issue's goals, one table per setting (its "
        "shape, concurrencies and --shared-memory replace those options): wire (goal 1), large "
        "(goal 2: 1, 16 and 64 MiB, in the request and in system shared memory), batching "
        "(goal 4: concurrency 64), all",
    )
    parser.add_argument(
        "--opserve-flag",
        action="append",
        default=[],
        metavar="FLAG",
        help="a flag added to opserve's command line (repeatable), e.g. --opserve-flag="
        "--busy-poll-us=0 to measure it without polling",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    servers = [
        name
        for name in SERVERS
        if not (name == "Triton" and args.opserve_only)
        and not (name == "opserve" and args.triton_only)
    ]
    peers: Path = args.peers.resolve()
    try:
        ensure_triton(peers)  # perf_analyzer is needed for opserve alone too
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    # the model repository, perf_analyzer's reports and the servers' logs; kept if anything failed
    workdir = Path(tempfile.mkdtemp(prefix="python-identity-"))
    repository = workdir / "repository"
    prepare_repository(repository)
    settings = (
        SUITES[args.suite] if args.suite else [(args.shape, args.concurrency, args.shared_memory)]
    )
    rows: list[dict[str, object]] = []
    failed: set[str] = set()
    cell_errors = False
    for shape, concurrency, shared_memory in settings:
        args.shape, args.concurrency, args.shared_memory = shape, concurrency, shared_memory
        results, not_ready, errors = run_rounds(servers, repository, peers, args, workdir)
        failed |= not_ready
        cell_errors |= errors
        rows += [
            {"shape": shape, "shared_memory": shared_memory, **row} for row in report(results, args)
        ]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if not failed and not cell_errors:
        shutil.rmtree(workdir)
    else:
        print(f"logs kept in {workdir}", file=sys.stderr)
    if failed:
        print(f"not measured: {', '.join(sorted(failed))} (see the errors above)", file=sys.stderr)
    if cell_errors:
        print("some cells failed (see the errors above)", file=sys.stderr)
    return 1 if failed or cell_errors else 0


if __name__ == "__main__":
    sys.exit(main())
