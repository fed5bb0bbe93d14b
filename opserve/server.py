"""Assembling the server: the model manager, the dataplane and the frontends, on one event loop."""

from __future__ import annotations

import asyncio
import logging

import uvicorn

from opserve.custom_metrics import CustomMetrics
from opserve.dataplane import DataPlane
from opserve.frontends.grpc import start_grpc_server
from opserve.frontends.http import HttpApp
from opserve.metrics import MetricsServer
from opserve.repository import ModelManager
from opserve.response_cache import ResponseCache
from opserve.services import ServerServices
from opserve.settings import ServerSettings

log = logging.getLogger(__name__)


async def serve(settings: ServerSettings) -> None:
    """Load every model, then serve until SIGINT or SIGTERM; unload everything on the way out."""
    manager = ModelManager(
        settings.model_repositories,
        settings.op_libraries,
        settings.ring_capacity,
        settings.op_library_roots,
        settings.model_load_timeout_secs,
    )
    if settings.cache is not None:
        manager.response_cache = ResponseCache(settings.cache.size)
    grpc_server = None
    metrics = None
    custom_metrics = CustomMetrics()
    dataplane = DataPlane(manager)
    manager.host = ServerServices(dataplane, custom_metrics)
    try:
        await manager.startup(settings.model_control_mode, settings.load_models)
        if settings.model_control_mode == "poll":
            manager.start_polling(settings.repository_poll_secs)
        if settings.allow_grpc:
            grpc_server = await start_grpc_server(
                dataplane, settings.grpc_address, settings.grpc_port
            )
        if settings.allow_metrics:
            metrics = MetricsServer(manager, custom_metrics)
            await metrics.start(settings.metrics_address, settings.metrics_port)
        config = uvicorn.Config(
            HttpApp(dataplane),
            host=settings.http_address,
            port=settings.http_port,
            http="httptools",
            lifespan="off",
            access_log=False,
            log_config=None,
            timeout_keep_alive=300,
            proxy_headers=False,  # a layer per request that serves no purpose here
        )
        http = uvicorn.Server(config)
        log.info("serving HTTP on %s:%d", settings.http_address, settings.http_port)
        await http.serve()
    finally:
        if grpc_server is not None:
            await grpc_server.stop(grace=2)
        if metrics is not None:
            await metrics.stop()
        log.info("shutting down: unloading models")
        await manager.shutdown()


def run(settings: ServerSettings) -> None:
    """Run `serve` on uvloop where it is installed."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(settings))
    else:
        uvloop.run(serve(settings))
