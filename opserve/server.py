"""Assembling the server: the model manager, the dataplane and the frontends, on one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import uvicorn

from opserve import collector
from opserve.collector import Settler
from opserve.custom_metrics import CustomMetrics
from opserve.dataplane import DataPlane
from opserve.frontends.grpc import start_grpc_server
from opserve.frontends.http import HttpApp
from opserve.frontends.http.protocol import HttpConnection
from opserve.logs import ServerLog
from opserve.metrics import MetricsServer
from opserve.polling import Polling
from opserve.repository import ModelManager
from opserve.response_cache import ResponseCache
from opserve.services import ServerServices
from opserve.settings import ServerSettings
from opserve.tracing import Tracer

log = logging.getLogger(__name__)

# pending connections the HTTP socket queues (uvicorn's default)
HTTP_BACKLOG = 2048


async def serve(settings: ServerSettings, server_log: ServerLog | None = None) -> int:
    """Load the models, then serve until SIGINT or SIGTERM; unload everything on the way out.
    The exit status: 1 when a model failed to load at start-up and `--exit-on-error` holds.

    A signal is honoured from the first moment (during start-up too): the server ends within
    `--exit-timeout-secs`, in-flight requests first, then the models (a worker that does not
    end in what is left of that time is killed)."""
    stop = _Stop(settings.exit_timeout_secs)
    # --http-thread-count: the threads `asyncio.to_thread` hands the frontends' heavy work to
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(settings.http_thread_count, thread_name_prefix="opserve-http")
    )
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
        execution_timeout_s=settings.execution_timeout_secs,
        remotes=settings.remote_repositories,
        shared_workers=settings.shared_workers,
    )
    if settings.cache is not None:
        manager.response_cache = ResponseCache(settings.cache.size)
    grpc_server = None
    grpc_stopping: asyncio.Task[None] | None = None
    metrics = None
    custom_metrics = CustomMetrics()
    tracer = Tracer(settings.trace)
    tracer.start()
    dataplane = DataPlane(
        manager,
        settings.server_id,
        settings.strict_readiness,
        server_log,
        tracer,
        Polling(settings.busy_poll_us),
    )
    manager.host = ServerServices(dataplane, custom_metrics)
    # the heap after loading is frozen, collected again when the repository changes (collector)
    collector.tune()
    settler = Settler()
    manager.on_change = settler.changed
    startup = asyncio.ensure_future(
        manager.startup(settings.model_control_mode, settings.load_models)
    )
    try:
        if not await _wait_for_startup(startup, stop, settings.startup_wait_secs):
            log.info("stopped during start-up")
            return stop.status
        failed = manager.failed_models()
        if failed and settings.exit_on_error:
            _log_failed(failed)
            return 1
        if not startup.done():
            log.warning(
                "start-up: %s still loading after %g s (--startup-wait-secs); serving the "
                "others meanwhile",
                ", ".join(f"'{n}'" for n in manager.loading_models()) or "models are",
                settings.startup_wait_secs,
            )
            startup.add_done_callback(
                lambda task: _late_startup_done(task, manager, stop, settings.exit_on_error)
            )
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
            server = grpc_server

            def stop_grpc(_: bool) -> None:
                nonlocal grpc_stopping
                if grpc_stopping is None:
                    grpc_stopping = asyncio.ensure_future(server.stop(grace=stop.remaining()))

            stop.listen(stop_grpc)
        if settings.allow_metrics:
            metrics = MetricsServer(
                manager, custom_metrics, settings.counter_latencies, settings.cpu_metrics
            )
            await metrics.start(settings.metrics_address, settings.metrics_port)
        if settings.allow_http:
            await _serve_http(dataplane, settings, stop)
        else:
            await stop.requested.wait()
        return stop.status
    finally:
        if not startup.done():
            startup.cancel()
        if grpc_stopping is not None:
            await grpc_stopping
        elif grpc_server is not None:
            await grpc_server.stop(grace=stop.remaining())
        if metrics is not None:
            await metrics.stop()
        log.info("shutting down: unloading models")
        manager.on_change = None
        settler.cancel()
        await manager.shutdown(stop.remaining())
        await asyncio.gather(startup, return_exceptions=True)
        tracer.close()


class _Stop:
    """SIGINT and SIGTERM for the server's whole life: the first asks it to stop and starts the
    `--exit-timeout-secs` budget; a second SIGINT ends HTTP at once (as uvicorn's would)."""

    def __init__(self, exit_timeout_s: float) -> None:
        self.exit_timeout_s = exit_timeout_s
        self.requested = asyncio.Event()
        self.status = 0
        self._deadline: float | None = None
        self._listeners: list[Callable[[bool], None]] = []
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._signalled, signum)

    def _signalled(self, signum: int) -> None:
        again = self.requested.is_set()
        log.info("received %s: stopping", signal.Signals(signum).name)
        self.request(0, force=again and signum == signal.SIGINT)

    def request(self, status: int, force: bool = False) -> None:
        if not self.requested.is_set():
            self.status = status
            self._deadline = time.monotonic() + self.exit_timeout_s
            self.requested.set()
        for listener in self._listeners:
            listener(force)

    def listen(self, listener: Callable[[bool], None]) -> None:
        """`listener(force)` runs when a stop is asked for (at once if it was already)."""
        self._listeners.append(listener)
        if self.requested.is_set():
            listener(False)

    def remaining(self) -> float:
        """Seconds left of the exit budget (all of it while no stop was asked for)."""
        if self._deadline is None:
            return float(self.exit_timeout_s)
        return max(self._deadline - time.monotonic(), 0.0)


async def _wait_for_startup(startup: asyncio.Future[None], stop: _Stop, wait_s: float) -> bool:
    """Wait for start-up loading, at most `wait_s` seconds; False when a stop came first."""
    stopped = asyncio.ensure_future(stop.requested.wait())
    either: list[asyncio.Future[Any]] = [startup, stopped]
    try:
        await asyncio.wait(either, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if stop.requested.is_set():
        return False
    if startup.done():
        startup.result()  # a bug, not a model's failure: raised
    return True


def _log_failed(failed: dict[str, str]) -> None:
    log.error(
        "failed to load all models (%s); exiting (--exit-on-error=false keeps serving the others)",
        "; ".join(f"'{name}': {reason}" for name, reason in failed.items()),
    )


def _late_startup_done(
    task: asyncio.Future[None], manager: ModelManager, stop: _Stop, exit_on_error: bool
) -> None:
    """Start-up loading that outlasted --startup-wait-secs has ended: with --exit-on-error, a
    model that failed stops the server (status 1)."""
    if task.cancelled():
        return
    if task.exception() is not None:
        log.error("start-up loading failed", exc_info=task.exception())
        stop.request(1)
        return
    log.info("start-up loading is complete")
    failed = manager.failed_models()
    if failed and exit_on_error:
        _log_failed(failed)
        stop.request(1)


async def _serve_http(dataplane: DataPlane, settings: ServerSettings, stop: _Stop) -> None:
    """HTTP: uvicorn's server running our protocol, on a socket bound here (SO_REUSEPORT with --reuse-http-port; the real
    port in the log when the flag says 0)."""
    family = socket.AF_INET6 if ":" in settings.http_address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if settings.reuse_http_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((settings.http_address, settings.http_port))
    # listening before the log line names the port: a client that reads it may connect at once
    sock.listen(HTTP_BACKLOG)
    limits = settings.http_limits
    config = uvicorn.Config(
        backlog=HTTP_BACKLOG,
        app=HttpApp(
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

    def stop_http(force: bool) -> None:
        http.should_exit = True
        http.force_exit = http.force_exit or force

    stop.listen(stop_http)
    log.info("serving HTTP on %s:%d", settings.http_address, sock.getsockname()[1])
    await http.serve(sockets=[sock])


class _HttpServer(uvicorn.Server):
    """uvicorn, without its own signal handling: the server's `_Stop` handles the signals
    from start-up on, and the server still has to unload its models (Python models'
    `finalize`) and flush traces once HTTP has stopped."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def run(settings: ServerSettings, server_log: ServerLog | None = None) -> int:
    """Run `serve` on uvloop where it is installed; the exit status."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(settings, server_log))
    return uvloop.run(serve(settings, server_log))
