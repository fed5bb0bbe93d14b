"""Assembling the server: the model manager, the dataplane and the frontends, on one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Iterator

import uvicorn

from opserve.custom_metrics import CustomMetrics
from opserve.dataplane import DataPlane
from opserve.frontends.grpc import start_grpc_server
from opserve.frontends.http import HttpApp
from opserve.frontends.http.protocol import HttpConnection
from opserve.logs import ServerLog
from opserve.metrics import MetricsServer
from opserve.repository import ModelManager
from opserve.response_cache import ResponseCache
from opserve.services import ServerServices
from opserve.settings import ServerSettings
from opserve.tracing import Tracer

log = logging.getLogger(__name__)


async def serve(settings: ServerSettings, server_log: ServerLog | None = None) -> int:
    """Load the models, then serve until SIGINT or SIGTERM; unload everything on the way out.
    The exit status: 1 when a model failed to load at start-up and `--exit-on-error` holds."""
    manager = ModelManager(
        settings.model_repositories,
        settings.op_libraries,
        settings.ring_capacity,
        settings.op_library_roots,
        settings.model_load_timeout_secs,
        auto_complete=settings.auto_complete,
        config_name=settings.model_config_name,
        load_threads=settings.model_load_thread_count,
        load_retries=settings.model_load_retry_count,
        default_max_batch_size=settings.default_max_batch_size,
        max_instances=(settings.max_instances_per_model, settings.max_instances_total),
    )
    if settings.cache is not None:
        manager.response_cache = ResponseCache(settings.cache.size)
    grpc_server = None
    metrics = None
    custom_metrics = CustomMetrics()
    tracer = Tracer(settings.trace)
    tracer.start()
    dataplane = DataPlane(
        manager, settings.server_id, settings.strict_readiness, server_log, tracer
    )
    manager.host = ServerServices(dataplane, custom_metrics)
    try:
        await manager.startup(settings.model_control_mode, settings.load_models)
        failed = manager.failed_models()
        if failed and settings.exit_on_error:
            log.error(
                "failed to load all models (%s); exiting (--exit-on-error=false keeps serving "
                "the others)",
                "; ".join(f"'{name}': {reason}" for name, reason in failed.items()),
            )
            return 1
        if settings.model_control_mode == "poll" and settings.repository_poll_secs > 0:
            manager.start_polling(settings.repository_poll_secs)
        if settings.allow_grpc:
            grpc_server = await start_grpc_server(
                dataplane,
                settings.grpc_address,
                settings.grpc_port,
                settings.grpc_keepalive,
                settings.grpc_compression,
                None
                if settings.grpc_tls is None
                else (settings.grpc_tls.key, settings.grpc_tls.certificate, settings.grpc_tls.root),
                settings.grpc_restrictions,
                settings.grpc_forward,
                settings.reuse_grpc_port,
                settings.grpc_max_input_size,
                settings.http_limits,
            )
        if settings.allow_metrics:
            metrics = MetricsServer(
                manager, custom_metrics, settings.counter_latencies, settings.cpu_metrics
            )
            await metrics.start(settings.metrics_address, settings.metrics_port)
        if settings.allow_http:
            await _serve_http(dataplane, settings)
        else:
            await _wait_for_signal()
        return 0
    finally:
        if grpc_server is not None:
            await grpc_server.stop(grace=settings.exit_timeout_secs)
        if metrics is not None:
            await metrics.stop()
        log.info("shutting down: unloading models")
        await manager.shutdown()
        tracer.close()


async def _serve_http(dataplane: DataPlane, settings: ServerSettings) -> None:
    """HTTP: uvicorn's server running our protocol, on a socket bound here (SO_REUSEPORT with --reuse-http-port; the real
    port in the log when the flag says 0)."""
    family = socket.AF_INET6 if ":" in settings.http_address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if settings.reuse_http_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((settings.http_address, settings.http_port))
    limits = settings.http_limits
    config = uvicorn.Config(
        HttpApp(
            dataplane, settings.http_restrictions, settings.http_forward, limits.max_input_size
        ),
        http=HttpConnection.bounded(limits),  # our HTTP/1.1 on httptools: one write per response
        lifespan="off",
        access_log=False,
        log_config=None,
        timeout_keep_alive=int(limits.keep_alive_timeout_s),
        timeout_graceful_shutdown=settings.exit_timeout_secs,
        proxy_headers=False,  # a layer per request that serves no purpose here
    )
    http = _HttpServer(config)
    log.info("serving HTTP on %s:%d", settings.http_address, sock.getsockname()[1])
    await http.serve(sockets=[sock])


class _HttpServer(uvicorn.Server):
    """uvicorn, except that the signal that stops it is not raised again once it has stopped:
    the server still has to unload its models (Python models' `finalize`) and flush traces."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            self._captured_signals.clear()


async def _wait_for_signal() -> None:
    """Without HTTP (--allow-http=false), serve until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


def run(settings: ServerSettings, server_log: ServerLog | None = None) -> int:
    """Run `serve` on uvloop where it is installed; the exit status."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(settings, server_log))
    return uvloop.run(serve(settings, server_log))
