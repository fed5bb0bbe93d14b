"""Assembling the server: the model manager, the dataplane and the frontends, on one event loop."""

from __future__ import annotations

import asyncio
import logging

import uvicorn

from opserve.dataplane import DataPlane
from opserve.frontends.http import HttpApp
from opserve.repository import ModelManager
from opserve.settings import ServerSettings

log = logging.getLogger(__name__)


async def serve(settings: ServerSettings) -> None:
    """Load every model, then serve until SIGINT or SIGTERM; unload everything on the way out."""
    manager = ModelManager(
        settings.model_repositories,
        settings.op_libraries,
        settings.ring_capacity,
        settings.op_library_roots,
    )
    try:
        await manager.startup(settings.model_control_mode, settings.load_models)
        dataplane = DataPlane(manager)
        config = uvicorn.Config(
            HttpApp(dataplane),
            host=settings.http_address,
            port=settings.http_port,
            http="httptools",
            lifespan="off",
            access_log=False,
            log_config=None,
            timeout_keep_alive=300,
        )
        http = uvicorn.Server(config)
        log.info("serving HTTP on %s:%d", settings.http_address, settings.http_port)
        await http.serve()
    finally:
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
