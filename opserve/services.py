"""What a model may ask of the server from inside its worker: run a request on another model
(BLS), write to the server's log, update custom metrics. The `WorkerHost` of every worker."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from opserve.custom_metrics import CustomMetrics
from opserve.dataplane import DataPlane
from opserve.errors import InvalidArgumentError, OpserveError, UnavailableError
from opserve.inference import Delivery, InferenceRequest
from opserve.workers.process import WorkerProcess

log = logging.getLogger("opserve.model")

_LEVELS = {
    "INFO": logging.INFO,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "VERBOSE": logging.DEBUG,
}


class ServerServices:
    def __init__(self, dataplane: DataPlane, metrics: CustomMetrics) -> None:
        self.dataplane = dataplane
        self.metrics = metrics

    async def bls(
        self, request: InferenceRequest, decoupled: bool, timeout_us: int
    ) -> AsyncIterator[tuple[Delivery, bool]]:
        """A model's request on any loaded model: one response, or with `decoupled` every
        response of a streaming model. Errors come back as items, never as a hang."""
        deadline = asyncio.get_running_loop().time() + timeout_us / 1e6 if timeout_us else None
        try:
            if decoupled:
                stream = self.dataplane.stream(request)
                async for item, final in _bounded(stream, deadline, request.model_name):
                    yield item, final
                return
            call = self.dataplane.infer(request)
            if deadline is not None:
                response = await asyncio.wait_for(call, timeout_us / 1e6)
            else:
                response = await call
            yield response, True
        except asyncio.TimeoutError:
            yield (
                UnavailableError(
                    f"request to model '{request.model_name}' timed out after {timeout_us} µs"
                ),
                True,
            )
        except OpserveError as exc:
            yield exc, True

    def call(self, worker: WorkerProcess, service: str, arguments: dict[str, Any]) -> Any:
        if service == "log":
            level = _LEVELS.get(str(arguments.get("level")), logging.INFO)
            model = arguments.get("model", worker.label)
            log.log(
                level, "%s (%s): %s", model, arguments.get("where", "?"), arguments.get("message")
            )
            return None
        if service == "metric":
            return self.metrics.handle(worker, arguments)
        if service == "repository":
            return self._repository(arguments)
        raise InvalidArgumentError(f"unknown service '{service}'")

    def _repository(self, arguments: dict[str, Any]) -> Any:
        """pb_utils.is_model_ready, load_model and unload_model."""
        action, model = arguments.get("action"), str(arguments.get("model", ""))
        if action == "ready":
            try:
                return self.dataplane.model_ready(model, str(arguments.get("version", "")))
            except OpserveError:
                return False
        if action == "load":
            config = arguments.get("config") or ""
            return self.dataplane.load_model(model, {"config": config} if config else {})
        if action == "unload":
            return self.dataplane.unload_model(model)
        raise InvalidArgumentError(f"unknown repository action '{action}'")

    def worker_ended(self, worker: WorkerProcess) -> None:
        self.metrics.release(worker)

    def poll_us(self) -> int:
        return self.dataplane.polling.worker_budget_us()


async def _bounded(
    stream: AsyncIterator[tuple[Delivery, bool]], deadline: float | None, model: str
) -> AsyncIterator[tuple[Delivery, bool]]:
    iterator = stream.__aiter__()
    loop = asyncio.get_running_loop()
    while True:
        timeout = None if deadline is None else max(deadline - loop.time(), 0)
        try:
            item = await asyncio.wait_for(iterator.__anext__(), timeout)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            await iterator.aclose()  # type: ignore[attr-defined]
            yield UnavailableError(f"streaming request to model '{model}' timed out"), True
            return
        yield item
