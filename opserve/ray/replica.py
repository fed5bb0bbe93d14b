"""One replica of a model's deployment: opserve's own model manager, dataplane and V2 HTTP app
for that one model, inside a Serve replica. The model loads as `opserve serve` loads it (op
libraries inspected, worker processes, scheduler, warm-up, a crashed worker replaced); requests
reach `HttpApp` as they would over HTTP, so answers and errors are the server's own."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from opserve.custom_metrics import CustomMetrics
from opserve.dataplane import DataPlane
from opserve.frontends.http import HttpApp
from opserve.proto import ModelConfig
from opserve.repository import ModelManager
from opserve.services import ServerServices

log = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]
# (status, headers, body): an HTTP answer as it travels back to the ingress
Answer = tuple[int, Headers, bytes]

REPLICA_HEADER = b"opserve-replica"  # which replica answered (every forwarded answer has it)


async def call_http_app(app: Any, method: str, path: str, headers: Headers, body: bytes) -> Answer:
    """Run an ASGI app on one whole request and collect its answer."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers,
    }
    delivered = False
    never = asyncio.Event()  # the client never leaves: the ingress went on waiting

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await never.wait()
        return {"type": "http.disconnect"}

    status = 500
    out_headers: Headers = []
    chunks: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, out_headers
        if message["type"] == "http.response.start":
            status = message["status"]
            out_headers = list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(bytes(message.get("body", b"")))

    await app(scope, receive, send)
    return status, out_headers, b"".join(chunks)


class ModelReplica:
    """Hosts one model of a repository (its worker processes with their custom ops), as
    `opserve serve --model-control-mode explicit --load-model NAME` would; `replica_config`
    replaces its `config.pbtxt` (one instance: the replicas are Serve's)."""

    # Serve awaits an async constructor
    async def __init__(  # type: ignore[misc]
        self,
        model_repository: str,
        model: str,
        replica_config: bytes | None = None,
        replica_id: str = "",
    ) -> None:
        self.model = model
        self.replica_id = replica_id or _serve_replica_id()
        self.manager = ModelManager([Path(model_repository)])
        self.dataplane = DataPlane(self.manager)
        self.manager.host = ServerServices(self.dataplane, CustomMetrics())
        self.app = HttpApp(self.dataplane)
        await self.manager.startup("explicit", [])
        config = None
        if replica_config is not None:
            config = ModelConfig()
            config.ParseFromString(replica_config)
        await self.manager.load(model, config)  # a failed load fails the replica, with why
        log.info("replica %s serves model '%s'", self.replica_id, model)

    async def forward(self, method: str, path: str, headers: Headers, body: bytes) -> Answer:
        """A V2 HTTP request for this model, answered by opserve's HTTP app."""
        status, out_headers, payload = await call_http_app(self.app, method, path, headers, body)
        out_headers.append((REPLICA_HEADER, self.replica_id.encode()))
        return status, out_headers, payload

    async def ready(self) -> bool:
        return self.dataplane.ready()

    async def statistics(self) -> list[dict[str, Any]]:
        return self.dataplane.model_statistics(self.model)

    async def index(self, ready_only: bool) -> list[dict[str, str]]:
        index = await self.dataplane.repository_index(ready_only)
        return [e for e in index if e["name"] == self.model]

    async def check_health(self) -> None:
        """Serve's health check: a replica whose model has no ready version (every worker gone
        and not coming back) is replaced."""
        self.manager.version(self.model)

    async def __del__(self) -> None:
        await self.manager.shutdown()


def _serve_replica_id() -> str:
    from ray import serve

    return str(serve.get_replica_context().replica_id.unique_id)
