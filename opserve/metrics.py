"""Prometheus metrics with Triton's names, read from the same statistics as the stats endpoints.

Served on `--metrics-port` (default 8002) at `/metrics` by a small asyncio server on the server's
event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from opserve.custom_metrics import CustomMetrics
from opserve.repository.manager import ModelManager

log = logging.getLogger(__name__)

_US = 1000  # ns per µs


class _TritonCounter(Metric):
    """A counter exposed under Triton's exact name. prometheus_client would add `_total` to a
    counter's name, which Triton's names (and dashboards built on them) lack, so it is exposed
    untyped: the samples are what PromQL reads, and they match Triton's."""

    def __init__(self, name: str, documentation: str) -> None:
        super().__init__(name, documentation + " (a counter)", "unknown")

    def add_metric(self, labels: list[str], value: float) -> None:
        self.add_sample(self.name, dict(zip(("model", "version"), labels, strict=True)), value)


class ModelMetricsCollector(Collector):
    """Triton's inference metrics, labelled `model` and `version`."""

    def __init__(self, manager: ModelManager, counter_latencies: bool = True) -> None:
        self.manager = manager
        self.counter_latencies = counter_latencies  # --metrics-config counter_latencies

    def collect(self) -> Iterator[Metric]:
        def counter(name: str, documentation: str) -> _TritonCounter:
            return _TritonCounter(name, documentation)

        success = counter("nv_inference_request_success", "Number of successful inference requests")
        failure = counter("nv_inference_request_failure", "Number of failed inference requests")
        count = counter(
            "nv_inference_count", "Number of inferences performed (batch elements count)"
        )
        executions = counter("nv_inference_exec_count", "Number of model executions performed")
        duration = counter(
            "nv_inference_request_duration_us",
            "Cumulative inference request duration in microseconds",
        )
        queue = counter(
            "nv_inference_queue_duration_us",
            "Cumulative inference queuing duration in microseconds",
        )
        compute_input = counter(
            "nv_inference_compute_input_duration_us",
            "Cumulative compute input duration in microseconds",
        )
        compute_infer = counter(
            "nv_inference_compute_infer_duration_us",
            "Cumulative compute inference duration in microseconds",
        )
        compute_output = counter(
            "nv_inference_compute_output_duration_us",
            "Cumulative inference compute output duration in microseconds",
        )
        cache_hits = counter("nv_cache_num_hits_per_model", "Number of cache hits per model")
        cache_misses = counter("nv_cache_num_misses_per_model", "Number of cache misses per model")
        cache_hit_time = counter(
            "nv_cache_hit_duration_per_model", "Total cache hit duration per model, in microseconds"
        )
        cache_miss_time = counter(
            "nv_cache_miss_duration_per_model",
            "Total cache miss (insertion) duration per model, in microseconds",
        )
        ready = GaugeMetricFamily(
            "opserve_model_ready", "1 when the model version is READY", labels=["model", "version"]
        )
        for model in self.manager.models.values():
            for entry in model.versions.values():
                labels = [model.name, str(entry.version)]
                stats = entry.stats
                success.add_metric(labels, stats.success.count)
                failure.add_metric(labels, stats.fail.count)
                count.add_metric(labels, stats.inference_count)
                executions.add_metric(labels, stats.execution_count)
                duration.add_metric(labels, (stats.success.ns + stats.fail.ns) // _US)
                queue.add_metric(labels, stats.queue.ns // _US)
                compute_input.add_metric(labels, stats.compute_input.ns // _US)
                compute_infer.add_metric(labels, stats.compute_infer.ns // _US)
                compute_output.add_metric(labels, stats.compute_output.ns // _US)
                ready.add_metric(labels, 1 if entry.ready else 0)
                if model.config.response_cache.enable:
                    cache_hits.add_metric(labels, stats.cache_hit.count)
                    cache_misses.add_metric(labels, stats.cache_miss.count)
                    cache_hit_time.add_metric(labels, stats.cache_hit.ns // _US)
                    cache_miss_time.add_metric(labels, stats.cache_miss.ns // _US)
        yield from (success, failure, count, executions)
        if self.counter_latencies:
            yield from (duration, queue, compute_input, compute_infer, compute_output)
        yield from (
            cache_hits,
            cache_misses,
            cache_hit_time,
            cache_miss_time,
            ready,
        )


class CustomMetricsCollector(Collector):
    """The metric families models defined (`pb_utils.MetricFamily`), under their own names."""

    def __init__(self, metrics: CustomMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        for family in list(self.metrics.families.values()):
            if family.kind == "histogram":
                exposed: Metric = Metric(family.name, family.description, "histogram")
                for labels, series in family.series.items():
                    cumulative = 0
                    for bound, count in zip(
                        [*series.buckets, float("inf")], series.counts, strict=True
                    ):
                        cumulative += count
                        bucket = {**dict(labels), "le": floatToGoString(bound)}
                        exposed.add_sample(family.name + "_bucket", bucket, cumulative)
                    exposed.add_sample(family.name + "_count", dict(labels), series.count)
                    exposed.add_sample(family.name + "_sum", dict(labels), series.total)
            else:
                kind = "gauge" if family.kind == "gauge" else "unknown"  # see _TritonCounter
                exposed = Metric(family.name, family.description, kind)
                for labels, series in family.series.items():
                    exposed.add_sample(family.name, dict(labels), series.value)
            yield exposed


class CpuMetricsCollector(Collector):
    """Triton's CPU metrics (`--allow-cpu-metrics`): utilization since the previous scrape, and
    memory, from /proc."""

    def __init__(self) -> None:
        self._last: tuple[int, int] | None = None  # (busy, total) jiffies at the last scrape

    def collect(self) -> Iterator[Metric]:
        utilization = GaugeMetricFamily("nv_cpu_utilization", "CPU utilization rate [0.0 - 1.0]")
        total_memory = GaugeMetricFamily(
            "nv_cpu_memory_total_bytes", "CPU total memory (RAM), in bytes"
        )
        used_memory = GaugeMetricFamily(
            "nv_cpu_memory_used_bytes", "CPU used memory (RAM), in bytes"
        )
        try:
            busy, total = _cpu_jiffies()
            memory = _meminfo()
        except OSError:
            return
        last, self._last = self._last, (busy, total)
        if last is not None and total > last[1]:
            utilization.add_metric([], (busy - last[0]) / (total - last[1]))
        else:
            utilization.add_metric([], busy / total if total else 0.0)
        total_memory.add_metric([], memory["MemTotal"])
        used_memory.add_metric([], memory["MemTotal"] - memory["MemAvailable"])
        yield from (utilization, total_memory, used_memory)


def _cpu_jiffies() -> tuple[int, int]:
    """Busy and total CPU time since boot, from the first line of /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user and nice
    return total - idle, total


def _meminfo() -> dict[str, int]:
    values = {}
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            key, _, rest = line.partition(":")
            values[key] = int(rest.split()[0]) * 1024
    return values


class MetricsServer:
    """`GET /metrics` in Prometheus' text format; anything else is 404."""

    def __init__(
        self,
        manager: ModelManager,
        custom: CustomMetrics | None = None,
        counter_latencies: bool = True,
        cpu_metrics: bool = True,
    ) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(ModelMetricsCollector(manager, counter_latencies))
        if cpu_metrics:
            self.registry.register(CpuMetricsCollector())
        if custom is not None:
            self.registry.register(CustomMetricsCollector(custom))
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port)
        bound = self._server.sockets[0].getsockname()[1] if self._server.sockets else port
        log.info("serving metrics on %s:%d", host, bound)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.readuntil(b"\r\n\r\n")
            line = request.split(b"\r\n", 1)[0].split()
            if len(line) >= 2 and line[0] == b"GET" and line[1].split(b"?")[0] == b"/metrics":
                body = generate_latest(self.registry)
                head = (
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                )
            else:
                body = b"not found\n"
                head = b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\n"
            writer.write(
                head + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
