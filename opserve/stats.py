"""Per model version statistics in Triton's shape: counts and cumulative durations.

One `VersionStats` per loaded version; the statistics endpoints and the Prometheus collector
read the same objects, so nothing is counted twice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        if ns > 0:  # a comparison, not a call of max(): this runs several times per request
            self.ns += ns

    def to_json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class VersionStats:
    """Triton's InferStatistics for one model version."""

    last_inference_ms: int = 0
    inference_count: int = 0  # inferences performed (a batch of 4 counts 4)
    execution_count: int = 0  # backend executions (a batch counts once)
    success: Duration = field(default_factory=Duration)  # whole request, arrival to response
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    cache_hit: Duration = field(default_factory=Duration)  # lookup and copy out, per hit
    cache_miss: Duration = field(default_factory=Duration)  # lookup and insertion, per miss
    batches: dict[int, BatchStats] = field(default_factory=dict)

    def record_execution(
        self, batch_size: int, input_ns: int, infer_ns: int, output_ns: int
    ) -> None:
        self.execution_count += 1
        batch = self.batches.setdefault(batch_size, BatchStats())
        batch.compute_input.add(input_ns)
        batch.compute_infer.add(infer_ns)
        batch.compute_output.add(output_ns)

    def record_success(
        self,
        batch_size: int,
        total_ns: int,
        queue_ns: int,
        input_ns: int,
        infer_ns: int,
        output_ns: int,
    ) -> None:
        """One request answered; compute times are those of the execution that served it."""
        self.inference_count += batch_size
        # `Duration.add` written out: this runs for every request, an ensemble's steps too
        for duration, ns in (
            (self.success, total_ns),
            (self.queue, queue_ns),
            (self.compute_input, input_ns),
            (self.compute_infer, infer_ns),
            (self.compute_output, output_ns),
        ):
            duration.count += 1
            if ns > 0:
                duration.ns += ns
        self.last_inference_ms = int(time.time() * 1000)

    def record_cache_hit(self, ns: int) -> None:
        """A request answered from the response cache: a success, but no inference or
        execution (Triton counts it so)."""
        self.success.add(ns)
        self.cache_hit.add(ns)
        self.last_inference_ms = int(time.time() * 1000)

    def record_cache_miss(self, ns: int) -> None:
        self.cache_miss.add(ns)

    def record_failure(self, total_ns: int) -> None:
        self.fail.add(total_ns)
        self.last_inference_ms = int(time.time() * 1000)

    def to_json(self, name: str, version: str) -> dict[str, Any]:
        """Triton's JSON for one entry of `model_stats` (64-bit counts as JSON numbers)."""
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.to_json(),
                "fail": self.fail.to_json(),
                "queue": self.queue.to_json(),
                "compute_input": self.compute_input.to_json(),
                "compute_infer": self.compute_infer.to_json(),
                "compute_output": self.compute_output.to_json(),
                "cache_hit": self.cache_hit.to_json(),
                "cache_miss": self.cache_miss.to_json(),
            },
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": batch.compute_input.to_json(),
                    "compute_infer": batch.compute_infer.to_json(),
                    "compute_output": batch.compute_output.to_json(),
                }
                for size, batch in sorted(self.batches.items())
            ],
            "memory_usage": [],
        }
