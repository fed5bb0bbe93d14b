"""The V2 HTTP frontend as a bare ASGI application, served by our own HTTP/1.1 protocol
(`protocol.py`, on httptools) inside uvicorn's server; any ASGI server can run it.

Routing is a split of the path: the hot path (`POST .../infer`) passes through no framework.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gzip
import logging
import re
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from opserve.dataplane import DataPlane, as_told_by
from opserve.errors import (
    ErrorCode,
    InvalidArgumentError,
    NotFoundError,
    OpserveError,
    UnavailableError,
)
from opserve.frontends.access import Restriction, forwarded, http_category, refusal
from opserve.frontends.http import shared_memory as shm_routes
from opserve.frontends.http.codec import OutputFormat, decode_request, encode_response
from opserve.frontends.http.generate import decode_generate, encode_generate, server_sent_event
from opserve.frontends.http.protocol import Exchange
from opserve.frontends.http.templates import RequestTemplates
from opserve.frontends.limits import HTTP_DEFAULT_MAX_INPUT_SIZE, body_too_large, inflate
from opserve.inference import Delivery, InferenceResponse

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

# The one place where opserve's error codes become HTTP statuses (Triton's mapping).
HTTP_STATUS = {
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.UNSUPPORTED: 501,
    ErrorCode.INTERNAL: 500,
}

_JSON = [(b"content-type", b"application/json")]


class HttpApp:
    def __init__(
        self,
        dataplane: DataPlane,
        restrictions: dict[str, Restriction] | None = None,
        forward: re.Pattern[str] | None = None,
        max_input_size: int = HTTP_DEFAULT_MAX_INPUT_SIZE,
    ) -> None:
        self.dataplane = dataplane
        self.restrictions = restrictions or {}  # --http-restricted-api
        self.forward = forward  # --http-header-forward-pattern
        self.max_input_size = max_input_size  # --http-max-input-size, inflated bodies too
        self.templates = RequestTemplates()  # inference headers decoded lately

    def answer_now(self, exchange: Exchange) -> bool:
        """Our protocol's way in for `POST /v2/models/<m>[/versions/<v>]/infer`: the request is
        decoded, validated and queued now, and answered from a callback when its response
        comes, with no task, no ASGI messages and no routing. False (nothing done) for anything
        else, or for what needs a task (a compressed body or answer, forwarded headers, access
        restrictions, shared memory, a trace, large BYTES inputs): the ASGI path takes those."""
        scope = exchange.scope
        path: str = scope["path"]
        if (
            scope["method"] != "POST"
            or not path.startswith("/v2/models/")
            or not path.endswith("/infer")
            or self.restrictions
            or self.forward is not None
        ):
            return False
        parts = path[11:-6].split("/")  # <m>, or <m>/versions/<v>
        if len(parts) == 1 and parts[0]:
            name, version = parts[0], ""
        elif len(parts) == 3 and parts[0] and parts[1] == "versions" and parts[2]:
            name, version = parts[0], parts[2]
        else:
            return False
        headers = _headers(scope)
        if b"content-encoding" in headers or b"accept-encoding" in headers:
            return False
        try:
            request, output_format = self.templates.decode(
                exchange.body,
                _header_length(headers),
                name,
                version,
                self.dataplane.shared_memory,
            )
            if output_format.regions is not None:  # leases to release whatever happens
                output_format.regions.release()
                return False
            request.client_gone = lambda: exchange.disconnected
            cancel = self.dataplane.submit(
                request, lambda outcome: _answer(exchange, outcome, output_format)
            )
            if cancel is None:
                return False
            exchange.on_disconnect = cancel
        except OpserveError as error:
            _respond_error(exchange, _infer_error(error))
        except Exception as exc:  # never crash a connection on a bug: report it
            log.exception("unhandled error for POST %s", path)
            _respond_error(exchange, _internal(exc), 500)
        return True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        try:
            await self._route(scope, receive, send)
        except OpserveError as exc:
            await _send_error(send, exc)
        except Exception as exc:  # never crash a connection on a bug: report it
            log.exception("unhandled error for %s %s", scope["method"], scope["path"])
            await _send_error(send, _internal(exc), 500)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        method: str = scope["method"]
        parts = [p for p in scope["path"].split("/") if p]
        if not parts or parts[0] != "v2":
            raise NotFoundError(f"unknown path '{scope['path']}'")
        parts = parts[1:]
        if self.restrictions:
            headers = ((k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"])
            refused = refusal(self.restrictions, http_category(parts), headers, "API")
            if refused is not None:
                return await _send_error(send, OpserveError(refused), 403)
        if not parts:
            _require(method, "GET")
            return await _send_json(send, self.dataplane.server_metadata())
        if parts[0] == "health" and len(parts) == 2 and parts[1] in ("live", "ready"):
            _require(method, "GET")
            ok = self.dataplane.live() if parts[1] == "live" else self.dataplane.ready()
            return await _send(send, 200 if ok else 400, b"")
        if parts[0] == "repository":
            return await self._repository_route(method, parts[1:], scope, receive, send)
        shared_memory = shm_routes.route(parts)
        if shared_memory is not None:
            kind, region, action = shared_memory
            _require(method, "GET" if action == "status" else "POST")
            body = (
                _json_object(await _read_body(receive, self.max_input_size))
                if action == "register"
                else {}
            )
            answer = shm_routes.handle(self.dataplane.shared_memory, kind, region, action, body)
            if answer is None:
                return await _send(send, 200, b"", _JSON)
            return await _send_json(send, answer)
        if parts == ["trace", "setting"]:
            return await self._trace_setting(method, "", receive, send)
        if parts == ["logging"]:
            if method == "POST":
                changes = _json_object(await _read_body(receive, self.max_input_size))
                return await _send_json(send, self.dataplane.update_log_settings(changes))
            _require(method, "GET")
            return await _send_json(send, self.dataplane.log_settings())
        if parts == ["models", "stats"]:
            _require(method, "GET")
            return await _send_json(send, {"model_stats": self.dataplane.model_statistics()})
        if parts[0] == "models" and len(parts) >= 2:
            name, rest = parts[1], parts[2:]
            version = ""
            if len(rest) >= 2 and rest[0] == "versions":
                version, rest = rest[1], rest[2:]
            return await self._model_route(method, name, version, rest, scope, receive, send)
        raise NotFoundError(f"unknown path '{scope['path']}'")

    async def _model_route(
        self,
        method: str,
        name: str,
        version: str,
        rest: list[str],
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        dataplane = self.dataplane
        if rest == ["infer"]:
            _require(method, "POST")
            return await self._infer(name, version, scope, receive, send)
        if rest in (["generate"], ["generate_stream"]):
            _require(method, "POST")
            return await self._generate(name, version, rest[0] == "generate_stream", receive, send)
        if not rest:
            _require(method, "GET")
            metadata = dataclasses.asdict(dataplane.model_metadata(name, version))
            return await _send_json(send, metadata)
        if rest == ["ready"]:
            _require(method, "GET")
            try:
                dataplane.model_ready(name, version)
            except OpserveError as exc:  # Triton answers 400 for a model that is not ready
                return await _send_error(send, exc, 400)
            return await _send(send, 200, b"")
        if rest == ["stats"]:
            _require(method, "GET")
            stats = {"model_stats": dataplane.model_statistics(name, version)}
            return await _send_json(send, stats)
        if rest == ["config"]:
            _require(method, "GET")
            return await _send_json(send, dataplane.model_config(name, version))
        if rest == ["trace", "setting"]:
            return await self._trace_setting(method, name, receive, send)
        raise NotFoundError(f"unknown path '{scope['path']}'")

    async def _trace_setting(self, method: str, model: str, receive: Receive, send: Send) -> None:
        """`/v2[/models/<m>]/trace/setting`: read, or update (a null value clears a model's
        own setting)."""
        if method == "POST":
            changes = _json_object(await _read_body(receive, self.max_input_size))
            return await _send_json(send, self.dataplane.update_trace_settings(model, changes))
        _require(method, "GET")
        return await _send_json(send, self.dataplane.trace_settings(model))

    async def _repository_route(
        self, method: str, parts: list[str], scope: Scope, receive: Receive, send: Send
    ) -> None:
        _require(method, "POST")
        body = _json_object(await _read_body(receive, self.max_input_size))
        if parts == ["index"]:
            ready = body.get("ready", False)
            if not isinstance(ready, bool):
                raise InvalidArgumentError("'ready' must be a boolean")
            return await _send_json(send, await self.dataplane.repository_index(ready))
        if len(parts) == 3 and parts[0] == "models" and parts[2] in ("load", "unload"):
            name = parts[1]
            if parts[2] == "load":
                parameters = body.get("parameters", {})
                if not isinstance(parameters, dict):
                    raise InvalidArgumentError("'parameters' must be a JSON object")
                await self.dataplane.load_model(name, parameters)
            else:
                await self.dataplane.unload_model(name)
            return await _send(send, 200, b"")
        raise NotFoundError(f"unknown path '{scope['path']}'")

    async def _infer(
        self, name: str, version: str, scope: Scope, receive: Receive, send: Send
    ) -> None:
        headers = _headers(scope)
        body = await _read_body(receive, self.max_input_size)
        encoding = headers.get(b"content-encoding")
        if encoding:  # inflated off the event loop (zlib lets go of the GIL), within the limit
            body = await asyncio.to_thread(
                inflate, body, encoding.decode("latin-1"), self.max_input_size
            )
        request, output_format = decode_request(
            body, _header_length(headers), name, version, self.dataplane.shared_memory
        )
        regions = output_format.regions
        if self.forward is not None:
            pairs = ((k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"])
            request.parameters.update(forwarded(self.forward, pairs))
        # A request whose client goes away while it waits is dropped before it runs. The
        # protocol marks a request's exchange (uvicorn: its cycle) when its client leaves: the scheduler looks at the mark when
        # it picks requests, which costs nothing per request; without the mark, a request that
        # has to wait is watched by a task of its own.
        watchers: list[asyncio.Task[bool]] = []
        cycle = getattr(receive, "__self__", None)
        if isinstance(getattr(cycle, "disconnected", None), bool):
            request.client_gone = lambda: cycle.disconnected  # type: ignore[union-attr]
        request.on_wait = lambda: watchers.append(  # runs in this request's task
            asyncio.ensure_future(_cancel_on_disconnect(receive, asyncio.current_task()))
        )
        try:
            response = await self.dataplane.infer(request)
            if regions is not None:
                regions.place_outputs(response)
        except OpserveError as error:
            raise _infer_error(error) from None
        except asyncio.CancelledError:
            if (
                watchers
                and watchers[0].done()
                and not watchers[0].cancelled()
                and watchers[0].result()
            ):
                log.debug("client went away: request to '%s' dropped", name)
                return
            raise
        finally:
            for watcher in watchers:
                watcher.cancel()
            if regions is not None:
                regions.release()
        parts, json_length = encode_response(response, output_format)
        out_headers = list(_answer_headers(json_length))  # compression may add one
        accept = headers.get(b"accept-encoding")
        if accept:
            payload = _maybe_compress(b"".join(parts), accept, out_headers)
            await _send(send, 200, payload, out_headers)
        else:  # the parts as they are: a large output is not copied into one body
            await _send(send, 200, parts, out_headers)

    async def _generate(
        self, name: str, version: str, streaming: bool, receive: Receive, send: Send
    ) -> None:
        """Triton's generate extension: one JSON answer, or server-sent events as they come."""
        model, _ = self.dataplane.manager.version(name, version)
        schema = self.dataplane.schema(model)
        request = decode_generate(
            await _read_body(receive, self.max_input_size), schema, name, version
        )
        stream = self.dataplane.stream(request)
        if not streaming:
            responses = []
            async for item, _final in stream:
                if isinstance(item, OpserveError):
                    raise item
                if item is not None:
                    responses.append(item)
            if len(responses) != 1:  # Triton's words
                raise InvalidArgumentError(
                    "generate expects model to produce exactly 1 response, use generate stream "
                    "for model that generates various number of responses"
                )
            return await _send(send, 200, encode_generate(responses[0]), _JSON)
        # the first item decides the status: a request refused outright, or whose first
        # answer is an error, is an ordinary error reply
        iterator = stream.__aiter__()
        first: tuple[Delivery, bool] | None
        try:
            first = await iterator.__anext__()
        except StopAsyncIteration:
            first = None
        if first is not None and isinstance(first[0], OpserveError):
            await iterator.aclose()  # type: ignore[attr-defined]
            raise first[0]
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        watcher = asyncio.ensure_future(_cancel_on_disconnect(receive, asyncio.current_task()))
        try:
            entry = first
            while entry is not None:
                delivery = entry[0]
                if isinstance(delivery, OpserveError):
                    event = orjson.dumps({"error": delivery.message})
                elif delivery is not None:
                    event = encode_generate(delivery)
                else:
                    event = b""
                if event:
                    await send(
                        {
                            "type": "http.response.body",
                            "body": server_sent_event(event),
                            "more_body": True,
                        }
                    )
                try:
                    entry = await iterator.__anext__()
                except StopAsyncIteration:
                    entry = None
        finally:
            watcher.cancel()
            await iterator.aclose()  # type: ignore[attr-defined]
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _header_length(headers: dict[bytes, bytes]) -> int | None:
    """The binary extension's Inference-Header-Content-Length, if the request has one."""
    value = headers.get(b"inference-header-content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        raise InvalidArgumentError("Inference-Header-Content-Length must be an integer") from None


def _infer_error(error: OpserveError) -> OpserveError:
    return as_told_by(error, "HTTP end point")


def _internal(exc: BaseException) -> OpserveError:
    return OpserveError(f"internal error: {type(exc).__name__}: {exc}")


@functools.lru_cache(maxsize=256)
def _answer_headers(json_length: int | None) -> list[tuple[bytes, bytes]]:
    """An inference response's headers: JSON, or the binary extension's (shared: read only)."""
    if json_length is None:
        return [(b"content-type", b"application/json")]
    return [
        (b"content-type", b"application/octet-stream"),
        (b"inference-header-content-length", str(json_length).encode()),
    ]


def _answer(
    exchange: Exchange, outcome: InferenceResponse | BaseException, output_format: OutputFormat
) -> None:
    """The response to a request of `HttpApp.answer_now`, once the model has answered."""
    try:
        if isinstance(outcome, OpserveError):
            _respond_error(exchange, _infer_error(outcome))
        elif isinstance(outcome, asyncio.CancelledError):  # the server is stopping
            _respond_error(
                exchange, UnavailableError("the request was cancelled: the server stops")
            )
        elif isinstance(outcome, BaseException):
            log.error("unhandled error in an inference", exc_info=outcome)
            _respond_error(exchange, _internal(outcome), 500)
        else:
            parts, json_length = encode_response(outcome, output_format)
            exchange.respond(200, _answer_headers(json_length), parts)
    except OpserveError as error:
        _respond_error(exchange, error)
    except Exception as exc:  # never leave a client waiting on a bug: report it
        log.exception("unhandled error answering an inference")
        _respond_error(exchange, _internal(exc), 500)


def _respond_error(exchange: Exchange, error: OpserveError, status: int | None = None) -> None:
    if not exchange.started:
        exchange.respond(_error_status(error, status), _JSON, _error_body(error))


def _error_status(error: OpserveError, status: int | None = None) -> int:
    return status or HTTP_STATUS.get(error.code, 400)


def _error_body(error: OpserveError) -> bytes:
    return orjson.dumps({"error": error.message})


async def _cancel_on_disconnect(receive: Receive, task: asyncio.Task[Any] | None) -> bool:
    """Wait for the client to disconnect, then cancel `task`; True when that happened."""
    message = await receive()
    if message.get("type") == "http.disconnect" and task is not None:
        task.cancel()
        return True
    return False


def _json_object(body: bytes) -> dict[str, Any]:
    """An optional JSON object body (repository requests may send none)."""
    if not body.strip():
        return {}
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgumentError(f"failed to parse the request JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidArgumentError("the request body must be a JSON object")
    return value


def _require(method: str, allowed: str) -> None:
    if method != allowed:
        raise InvalidArgumentError(f"method {method} is not allowed here; use {allowed}")


def _headers(scope: Scope) -> dict[bytes, bytes]:
    return dict(scope["headers"])  # ASGI: the server gives header names in lower case


async def _read_body(receive: Receive, limit: int = HTTP_DEFAULT_MAX_INPUT_SIZE) -> bytes:
    """The whole body (our protocol has bounded it already; another ASGI server may not have)."""
    message = await receive()
    body = message.get("body", b"")
    if not message.get("more_body"):
        return body
    chunks = [body]
    size = len(body)
    while message.get("more_body"):
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise InvalidArgumentError(body_too_large(None, limit))
        chunks.append(chunk)
    return b"".join(chunks)


def _maybe_compress(
    payload: bytes, accept: bytes | None, headers: list[tuple[bytes, bytes]]
) -> bytes:
    if not accept:
        return payload
    accepted = {a.split(b";")[0].strip() for a in accept.split(b",")}
    if b"gzip" in accepted:
        headers.append((b"content-encoding", b"gzip"))
        return gzip.compress(payload, compresslevel=1)
    if b"deflate" in accepted:
        headers.append((b"content-encoding", b"deflate"))
        return zlib.compress(payload, 1)
    return payload


async def _send(
    send: Send,
    status: int,
    body: bytes | list[bytes | memoryview],
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    exchange = getattr(send, "__self__", None)
    if type(exchange) is Exchange:  # our own protocol: the whole response in one write
        exchange.respond(status, headers or [], body)
        return
    if isinstance(body, list):
        body = b"".join(body)
    headers = list(headers or [])
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _send_json(send: Send, value: Any) -> None:
    await _send(send, 200, orjson.dumps(value), _JSON)


async def _send_error(send: Send, error: OpserveError, status: int | None = None) -> None:
    await _send(send, _error_status(error, status), _error_body(error), _JSON)
