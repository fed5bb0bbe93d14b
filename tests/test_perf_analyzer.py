"""perf_analyzer, Triton's own load tool (C++), works against opserve unchanged, HTTP and gRPC.

It reads the model's config and statistics in Triton's JSON shape before it sends load, and checks
its own counts against the server's. Installed by scripts/install-perf-analyzer (CI runs it).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.serving import RunningServer

ROOT = Path(__file__).resolve().parents[1]
PERF_ANALYZER = ROOT / ".venv-perf-analyzer" / "bin" / "perf_analyzer"

pytestmark = pytest.mark.skipif(
    not PERF_ANALYZER.exists(),
    reason="perf_analyzer is not installed: run scripts/install-perf-analyzer",
)


def cuda_runtime_dir() -> str:
    (found,) = (ROOT / ".venv-perf-analyzer").glob(
        "lib/python3*/site-packages/nvidia/cuda_runtime/lib"
    )
    return str(found)


@pytest.mark.parametrize(
    ("protocol", "shared_memory"),
    [("http", "none"), ("grpc", "none"), ("http", "system"), ("grpc", "system")],
)
def test_perf_analyzer(server: RunningServer, protocol: str, shared_memory: str) -> None:
    """`--shared-memory system`: inputs and outputs in regions perf_analyzer registers."""
    url = server.url if protocol == "http" else server.grpc_url
    env = {**os.environ, "LD_LIBRARY_PATH": cuda_runtime_dir()}
    result = subprocess.run(
        [
            str(PERF_ANALYZER),
            "-m",
            "simple",
            "-u",
            url,
            "-i",
            protocol,
            "-b",
            "2",
            "--concurrency-range",
            "2",
            "--measurement-interval",
            "1000",
            # compatibility is the point here, not a steady machine: a shared CI host's noise
            # must not fail the run (the default asks windows to agree within 10%)
            "--stability-percentage",
            "50",
            "--max-trials",
            "20",
            "--shared-memory",
            shared_memory,
            "-v",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Concurrency: 2, throughput:" in result.stdout
    assert "Successful request count:" in result.stdout  # read from our /stats
