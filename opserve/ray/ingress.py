"""The application's ingress: V2 HTTP on Serve's HTTP port. A model's requests (infer, metadata,
ready, config, statistics) go whole to a replica of that model's deployment, whose opserve HTTP
app answers them; the server's own routes (metadata, health, statistics of every model,
repository index) are answered here from the replicas. A request whose replica died under it
is sent again to another replica."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson

from opserve import __version__
from opserve.errors import (
    InvalidArgumentError,
    NotFoundError,
    OpserveError,
    UnavailableError,
    UnsupportedError,
)
from opserve.frontends.http.app import HTTP_STATUS
from opserve.ray.replica import Answer, Headers

log = logging.getLogger(__name__)

# What works through the ingress (shared memory, logging and trace settings, model control
# stay with a single server: a replica's process is not the client's host)
EXTENSIONS = ("classification", "binary_tensor_data", "model_configuration", "statistics")
ATTEMPTS = 3  # a request is sent again when its replica dies under it, at most this often
ATTEMPTS_HEADER = b"opserve-attempts"  # on an answer that took more than one attempt
_JSON = [(b"content-type", b"application/json")]
# set by the response Serve sends, not taken from the replica's answer
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection"})


class V2Ingress:
    """Routes V2 HTTP requests to the model deployments (`handles`: model name -> handle)."""

    def __init__(self, handles: dict[str, Any], server_id: str = "triton") -> None:
        self.handles = handles
        self.server_id = server_id

    async def __call__(self, request: Any) -> Any:
        """Serve's HTTP entry: a Starlette request in, a Starlette response out."""
        from starlette.responses import Response

        body = await request.body()
        status, headers, payload = await self.answer(
            request.method, request.url.path, list(request.headers.raw), body
        )
        response = Response(content=payload, status_code=status)
        for name, value in headers:
            if name.lower() not in _FRAMING:
                response.headers.append(name.decode("latin-1"), value.decode("latin-1"))
        return response

    async def answer(self, method: str, path: str, headers: Headers, body: bytes) -> Answer:
        try:
            return await self._route(method, path, headers, body)
        except OpserveError as exc:
            return _error(exc)
        except Exception as exc:  # a bug or a Ray failure: reported, never a dropped connection
            log.exception("unhandled error for %s %s", method, path)
            return _error(OpserveError(f"internal error: {type(exc).__name__}: {exc}"), 500)

    async def _route(self, method: str, path: str, headers: Headers, body: bytes) -> Answer:
        parts = [p for p in path.split("/") if p]
        if not parts or parts[0] != "v2":
            raise NotFoundError(f"unknown path '{path}'")
        parts = parts[1:]
        if not parts:
            return _json(
                {"name": self.server_id, "version": __version__, "extensions": list(EXTENSIONS)}
            )
        if parts == ["health", "live"]:
            return 200, [], b""
        if parts == ["health", "ready"]:
            ready = await asyncio.gather(*(h.ready.remote() for h in self.handles.values()))
            return (200 if all(ready) else 400), [], b""
        if parts == ["models", "stats"]:
            stats = await asyncio.gather(*(h.statistics.remote() for h in self.handles.values()))
            return _json({"model_stats": [entry for each in stats for entry in each]})
        if parts == ["repository", "index"]:
            ready_only = _ready_only(body)
            index = await asyncio.gather(
                *(h.index.remote(ready_only) for h in self.handles.values())
            )
            return _json([entry for each in index for entry in each])
        if parts[0] == "models" and len(parts) >= 2:
            handle = self.handles.get(parts[1])
            if handle is None:  # Triton's words
                raise NotFoundError(f"Request for unknown model: '{parts[1]}' is not found")
            return await self._forward(handle, method, path, headers, body)
        raise UnsupportedError(
            f"'{path}' is not served through Ray Serve (shared memory, logging and trace "
            "settings and model control belong to a single opserve server)"
        )

    async def _forward(
        self, handle: Any, method: str, path: str, headers: Headers, body: bytes
    ) -> Answer:
        from ray.exceptions import RayActorError

        for attempt in range(1, ATTEMPTS + 1):
            try:
                status, out_headers, payload = await handle.forward.remote(
                    method, path, headers, body
                )
                if attempt > 1:  # sent again: the answer says so
                    out_headers.append((ATTEMPTS_HEADER, str(attempt).encode()))
                return status, out_headers, payload
            except RayActorError as exc:  # the replica died (or is unreachable) under it
                log.warning(
                    "%s %s: its replica is gone (%s); attempt %d", method, path, exc, attempt
                )
        raise UnavailableError(f"every replica that took '{path}' died ({ATTEMPTS} attempts)")


def _ready_only(body: bytes) -> bool:
    """The index request's `ready` flag (an empty body: false)."""
    if not body.strip():
        return False
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgumentError(f"failed to parse the request JSON: {exc}") from None
    ready = value.get("ready", False) if isinstance(value, dict) else None
    if not isinstance(ready, bool):
        raise InvalidArgumentError("'ready' must be a boolean")
    return ready


def _json(value: Any) -> Answer:
    return 200, list(_JSON), orjson.dumps(value)


def _error(error: OpserveError, status: int | None = None) -> Answer:
    status = status or HTTP_STATUS.get(error.code, 400)
    return status, list(_JSON), orjson.dumps({"error": error.message})
