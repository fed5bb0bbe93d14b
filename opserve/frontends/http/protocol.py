"""HTTP/1.1 on httptools for the V2 frontend: each response leaves in one `transport.write`.

uvicorn still runs the server (listening, signals, graceful shutdown); this is the protocol it
starts per connection (`uvicorn.Config(http=HttpConnection)`). It parses with httptools, hands
the application one `Exchange` per request once the whole body is in (the ASGI `receive` and
`send`, plus `respond` for a complete answer without ASGI messages), keeps connections alive,
answers pipelined requests in order, marks a request whose client went away (`disconnected`,
which the scheduler looks at) and streams (server-sent events) with chunked transfer coding.

It is bounded (`ConnectionLimits`): a body over the size limit is refused as soon as its
Content-Length says so, or as soon as its chunks add up past the limit, without being read;
headers that take too long, a body that stalls, a connection that never sends a request are
closed (408 where a request had begun); past the connection limit, new connections are answered
503 and closed while the others carry on.
"""

from __future__ import annotations

import asyncio
import http
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import unquote

import httptools
import orjson

from opserve.frontends.limits import ConnectionLimits, body_too_large

log = logging.getLogger(__name__)

App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

COALESCE_BYTES = 1 << 16  # a larger body is written after its head rather than copied into it
LINGER_S = 5.0  # after refusing a body: how long what the client still sends is read and dropped
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_NO_BODY_STATUSES = (204, 304)


def _status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return f"HTTP/1.1 {status} {phrase}\r\n".encode("latin-1")


STATUS_LINE = {status: _status_line(status) for status in range(100, 600)}


def _head(status: int, headers: Headers, extra: bytes) -> list[bytes]:
    """The status line and headers (`extra`: framing headers and the blank line) as parts."""
    parts = [STATUS_LINE.get(status) or _status_line(status)]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(extra)
    return parts


@dataclass(frozen=True, slots=True)
class _KnownHead:
    """A request's head (request line, headers, blank line) as it came, and what it parsed to."""

    head: bytes
    size: int  # with its body
    scope: dict[str, Any]  # copied for each request (its `headers` list is shared: read only)
    keep_alive: bool


class Exchange:
    """One request on a connection and its response: the ASGI `receive` and `send` the
    application is given, and `respond` for a whole response at once."""

    __slots__ = (
        "scope",
        "body",
        "keep_alive",
        "disconnected",
        "complete",
        "_connection",
        "_head_only",
        "_body_given",
        "_waiter",
        "_pending_head",
        "_chunked",
        "_head_written",
        "on_disconnect",
    )

    def __init__(
        self, connection: HttpConnection, scope: dict[str, Any], body: bytes, keep_alive: bool
    ) -> None:
        self.scope = scope
        self.body = body
        self.keep_alive = keep_alive
        self.disconnected = False  # the client went away before its response was complete
        self.complete = False  # the whole response was written
        self._connection = connection
        self._head_only = scope["method"] == "HEAD"
        self._body_given = False
        self._waiter: asyncio.Future[None] | None = None
        self._pending_head: tuple[int, Headers] | None = None  # started, not yet written
        self._chunked = False
        self._head_written = False
        # called if the client goes away before the response is complete (`HttpApp.answer_now`
        # cancels its request so); an ASGI application watches `receive` instead
        self.on_disconnect: Callable[[], None] | None = None

    @property
    def started(self) -> bool:
        return self._pending_head is not None or self._head_written or self.complete

    def respond(
        self, status: int, headers: Headers, body: bytes | list[bytes | memoryview]
    ) -> None:
        """The whole response: status line, headers, a Content-Length and the body (bytes, or
        parts that follow one another), in one write; a large body's parts are handed to the
        transport as they are (one vectored write), not copied into one buffer."""
        if self.started:
            raise RuntimeError("the response has already started")
        if self.disconnected:
            self._finish()
            return
        bodies = [body] if isinstance(body, (bytes, bytearray, memoryview)) else body
        size = sum(map(len, bodies))
        extra = b"content-length: %d\r\n" % size
        if not self.keep_alive:
            extra += b"connection: close\r\n"
        parts = _head(status, headers, extra + b"\r\n")
        transport = self._connection.transport
        if self._head_only:
            transport.write(b"".join(parts))
        elif size <= COALESCE_BYTES:
            transport.write(b"".join([*parts, *bodies]))
        else:
            transport.writelines([b"".join(parts), *bodies])
        self._finish()

    # ASGI

    async def receive(self) -> dict[str, Any]:
        """The body (all of it, in one message), then `http.disconnect` once the client has gone
        or the response is complete."""
        if not self._body_given:
            self._body_given = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        if not (self.disconnected or self.complete):
            if self._waiter is None or self._waiter.done():  # done: a watcher was cancelled
                self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            if self.started:
                raise RuntimeError("http.response.start sent twice")
            self._pending_head = (message["status"], list(message.get("headers", ())))
            return
        if kind != "http.response.body" or not self.started or self.complete:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")
        body: bytes = message.get("body", b"")
        more: bool = message.get("more_body", False)
        if self.disconnected:
            if not more:
                self._finish()
            return
        parts: list[bytes] = []
        if self._pending_head is not None:  # the head goes out with the first body
            status, headers = self._pending_head
            self._pending_head = None
            self._head_written = True
            if not self.keep_alive:
                headers.append((b"connection", b"close"))
            if self._head_only or status in _NO_BODY_STATUSES:
                self._head_only = True
                framing = b"\r\n"
            elif any(name.lower() == b"content-length" for name, _ in headers):
                framing = b"\r\n"
            else:
                self._chunked = True
                framing = b"transfer-encoding: chunked\r\n\r\n"
            parts = _head(status, headers, framing)
        if self._head_only:
            pass
        elif self._chunked:
            parts += _chunk(body, more)
        elif body:
            parts.append(body)
        if parts:
            self._connection.transport.write(b"".join(parts))
        if more:
            await self._connection.drain()
        else:
            self._finish()

    def _finish(self) -> None:
        if self.complete:
            return
        self.complete = True
        # nothing to cancel any more; and what it holds (the request, its future) would form a
        # cycle with this exchange, left for the garbage collector
        self.on_disconnect = None
        self.wake()
        self._connection.response_complete(self)

    def wake(self) -> None:
        """Answer a waiting `receive` (the client went away, or the response is complete)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _chunk(body: bytes, more: bool) -> list[bytes]:
    parts = [b"%x\r\n" % len(body), body, b"\r\n"] if body else []
    if not more:
        parts.append(b"0\r\n\r\n")
    return parts


class HttpConnection(asyncio.Protocol):
    """One client connection: requests in, responses out in order (uvicorn's protocol interface:
    constructed with its config and server state, `shutdown` for a graceful stop)."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()
    _refused_at: ClassVar[float] = -60.0  # when a connection over the limit was last logged

    @classmethod
    def bounded(cls, limits: ConnectionLimits) -> type[HttpConnection]:
        """This protocol under `limits` (uvicorn constructs the protocol class it is given)."""
        return type("BoundedHttpConnection", (cls,), {"limits": limits})

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any] | None = None,
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.app: App = config.app
        # the application's task-free way for what it can answer so (`HttpApp.answer_now`)
        self.answer_now: Callable[[Exchange], bool] | None = getattr(config.app, "answer_now", None)
        self.loop = _loop or asyncio.get_event_loop()
        self.server_state = server_state
        self.keep_alive_timeout: float = config.timeout_keep_alive
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.current: Exchange | None = None  # the request being answered
        self.queue: deque[Exchange] = deque()  # pipelined requests behind it
        self.closing = False
        self.idle_since = 0.0
        self.now = 0.0  # the loop's time at the last read
        self.timer: asyncio.TimerHandle | None = None  # one per connection, re-armed lazily
        self.timer_at = float("inf")
        self.served = False  # a request has begun on this connection
        self.reading = False  # a request is arriving (begun, not complete)
        self.headers_done = False
        self.began_at = 0.0
        self.discarding = False  # a body was refused: what arrives is dropped until we close
        # an error for a request that came behind others: sent once they are answered
        self.refusal: tuple[int, bytes, bytes, bool] | None = None
        self.write_paused = False
        self.drained: asyncio.Future[None] | None = None
        # the request being parsed
        self.url = b""
        self.headers: Headers = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.declared_size = b""  # the request's Content-Length
        self.expect = b""  # its Expect header
        self.keep_alive = True
        self.plain = True  # framed by its Content-Length alone (no Transfer-Encoding, no upgrade)
        self.last: tuple[dict[str, Any], bytes] | None = None  # the last scope and body parsed
        # the last request's head when it came whole in one read: a read that holds the same
        # head and a whole body is a request like it, taken without the parser (perf_analyzer
        # and most clients send the same head each time)
        self.known_head: _KnownHead | None = None
        self.completed = 0  # requests completed in the read being parsed
        self.begun_in_chunk = False  # the request being parsed began in that read

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        connections = self.server_state.connections
        if len(connections) >= self.limits.max_connections:
            self._over_the_limit()
            return
        connections.add(self)
        self.idle_since = self.now = self.loop.time()
        self._arm(self.now + self.limits.first_request_timeout_s)

    def data_received(self, data: bytes) -> None:
        if self.discarding:
            return
        self.idle_since = self.now = self.loop.time()
        known = self.known_head
        if (
            known is not None
            and not self.reading
            and len(data) == known.size
            and data.startswith(known.head)
        ):  # the last request's head again, with a whole body: nothing to parse
            self.served = True
            body = data[len(known.head) :]
            self._received(Exchange(self, dict(known.scope), body, known.keep_alive))
            return
        self.completed = 0
        self.begun_in_chunk = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.plain = False  # no upgrades here: the request is answered as it is
        except httptools.HttpParserError:
            self.last = None
            if not self.closing:  # else a callback refused the request and stopped the parser
                self._refuse(400, b"Invalid HTTP request received.")
            return
        if self.completed == 1 and self.begun_in_chunk and not self.reading:
            self._learn_head(data)
        self.last = None  # holds no body beyond its read
        if self.reading:  # a request is partly in: it must go on arriving
            limits = self.limits
            if self.headers_done:
                self._arm(self.now + limits.body_timeout_s)
            else:
                self._arm(self.began_at + limits.header_timeout_s)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.server_state.connections.discard(self)
        self.closing = True
        if self.timer is not None:
            self.timer.cancel()
        current = self.current
        if current is not None and not current.complete:
            current.disconnected = True
            current.wake()
            if current.on_disconnect is not None:
                current.on_disconnect()
        self.queue.clear()
        self._resume()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._resume()

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.begun_in_chunk = self.completed == 0
        self.plain = True
        self.url = b""
        self.headers = []
        self.chunks = []
        self.size = 0
        self.declared_size = b""
        self.expect = b""
        self.served = self.reading = True
        self.headers_done = False
        self.began_at = self.now

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length":
            self.declared_size = value
        elif name == b"expect":
            self.expect = value
        elif name == b"transfer-encoding":
            self.plain = False
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.headers_done = True
        if self.declared_size:  # refused before a byte of the body is read
            limit = self.limits.max_input_size
            declared = int(self.declared_size)  # httptools has checked that it is a number
            if declared > limit:
                self._refuse_body(body_too_large(declared, limit))
        parser = self.parser
        self.keep_alive = parser.should_keep_alive() and parser.get_http_version() != "1.0"
        if self.expect and self.current is None and not self.queue:
            if self.expect.lower() == b"100-continue":
                self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > self.limits.max_input_size:  # chunks, counted as they arrive
            self._refuse_body(body_too_large(None, self.limits.max_input_size))
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.reading = False
        url = self.url
        path_bytes, _, query = url.partition(b"?")
        path = path_bytes.decode("latin-1")
        if "%" in path:
            path = unquote(path)
        chunks = self.chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        scope = {
            "type": "http",
            "http_version": self.parser.get_http_version(),
            "method": self.parser.get_method().decode("ascii"),
            "path": path,
            "raw_path": path_bytes,
            "query_string": query,
            "headers": self.headers,
        }
        self.completed += 1
        self.last = (scope, body)
        self._received(Exchange(self, scope, body, self.keep_alive))

    def _learn_head(self, data: bytes) -> None:
        """`data` was one whole request: remember its head when a request that repeats it
        byte for byte needs no parsing (a Content-Length, no other framing, no Expect)."""
        self.known_head = None
        last = self.last
        if last is None or not self.plain or self.expect or not self.keep_alive:
            return
        if not self.declared_size:
            return
        scope, body = last
        head_length = len(data) - len(body)
        if (
            head_length >= 4
            and data.startswith(b"\r\n\r\n", head_length - 4)
            and data.endswith(body)  # nothing after the body (a stray CRLF llhttp skipped)
        ):
            self.known_head = _KnownHead(data[:head_length], len(data), scope, True)

    # the connection's requests

    def _received(self, exchange: Exchange) -> None:
        if self.current is None:
            self._start(exchange)
        else:
            self.queue.append(exchange)
            self.transport.pause_reading()

    def _start(self, exchange: Exchange) -> None:
        self.current = exchange
        if self.answer_now is not None and self.answer_now(exchange):
            return  # an inference, answered from a callback without a task
        task = self.loop.create_task(self._run(exchange))
        tasks = self.server_state.tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _run(self, exchange: Exchange) -> None:
        try:
            await self.app(exchange.scope, exchange.receive, exchange.send)
        except asyncio.CancelledError:  # its client went away, or the server stops: no answer
            if exchange.started and not exchange.complete:
                self.transport.close()
            raise
        except BaseException:  # the application answers its own errors: this is a bug
            log.exception("unhandled error in the HTTP application")
            if not exchange.started:
                exchange.keep_alive = False
                exchange.respond(
                    500, [(b"content-type", b"text/plain; charset=utf-8")], b"Internal Server Error"
                )
            elif not exchange.complete:
                self.transport.close()
        else:
            if not exchange.complete and not exchange.disconnected:
                log.error("the HTTP application returned without completing its response")
                if not exchange.started:
                    exchange.keep_alive = False
                    exchange.respond(500, [], b"")
                else:
                    self.transport.close()

    def response_complete(self, exchange: Exchange) -> None:
        """After `exchange`'s last byte: the next pipelined request, or the wait for one."""
        self.server_state.total_requests += 1
        if exchange is not self.current:
            return
        self.current = None
        if self.transport.is_closing():
            return
        if self.refusal is not None and exchange.keep_alive:  # the requests before it first
            if self.queue:
                self._start(self.queue.popleft())
            else:
                self._send_refusal(*self.refusal)
            return
        if self.closing or not exchange.keep_alive:  # the server stops, or the client asked
            self.transport.close()
            return
        self.idle_since = self.loop.time()
        if self.queue:
            self._start(self.queue.popleft())
            if not self.queue:
                self.transport.resume_reading()

    def shutdown(self) -> None:
        """The server stops: close now when idle, else after the response in progress."""
        self.closing = True
        self.queue.clear()
        if self.current is None:
            self.transport.close()
        else:
            self.current.keep_alive = False

    async def drain(self) -> None:
        """Wait while the transport's buffer is over its high-water mark."""
        if self.write_paused and not self.transport.is_closing():
            if self.drained is None or self.drained.done():
                self.drained = self.loop.create_future()
            await self.drained

    def _resume(self) -> None:
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def _refuse(
        self,
        status: int,
        message: bytes,
        content_type: bytes = b"text/plain",
        linger: bool = False,
    ) -> None:
        """A request that cannot be answered: an error, and the connection closes (`linger`:
        once the client has had time to read the error while it sends). The requests that came
        before it, pipelined, are answered first; nothing more is read."""
        self.closing = True
        self.discarding = True
        if self.current is None:
            self._send_refusal(status, message, content_type, linger)
        else:
            self.refusal = (status, message, content_type, linger)

    def _send_refusal(self, status: int, message: bytes, content_type: bytes, linger: bool) -> None:
        self.refusal = None
        head = _head(
            status,
            [(b"content-type", content_type)],
            b"content-length: %d\r\nconnection: close\r\n\r\n" % len(message),
        )
        self.transport.write(b"".join(head) + message)
        if linger and self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)
            return
        self.transport.close()

    def _refuse_body(self, message: str) -> None:
        """A body over the limit: Triton's 400, and the parser stops. The client, which may still
        be sending, gets the end of our side, and what it sends is read and dropped for a while
        (a close with unread data would reset the connection, and the answer with it)."""
        self._refuse(400, orjson.dumps({"error": message}), b"application/json", linger=True)
        raise _Refused

    def _over_the_limit(self) -> None:
        """A connection past --http-max-connections: 503 and close; the others carry on."""
        self.closing = True
        message = b'{"error":"too many connections: the server is at --http-max-connections"}'
        self._send_refusal(503, message, b"application/json", linger=False)
        now = self.loop.time()
        if now - HttpConnection._refused_at >= 60.0:  # once a minute at most
            HttpConnection._refused_at = now
            log.warning(
                "HTTP connection refused: %d connections are open (--http-max-connections)",
                self.limits.max_connections,
            )

    # the connection's one timer

    def _arm(self, deadline: float) -> None:
        """Make sure the timer fires by `deadline` (it is moved only when earlier)."""
        if deadline < self.timer_at:
            if self.timer is not None:
                self.timer.cancel()
            self.timer_at = deadline
            self.timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self.timer, self.timer_at = None, float("inf")
        if self.closing or self.transport.is_closing():
            return
        limits = self.limits
        now = self.loop.time()
        if self.current is not None or self.queue:  # busy: time counts from its response
            self._arm(now + max(min(limits.header_timeout_s, self.keep_alive_timeout), 1.0))
            return
        if self.reading and not self.headers_done:
            deadline, why = self.began_at + limits.header_timeout_s, "headers"
        elif self.reading:
            deadline, why = self.idle_since + limits.body_timeout_s, "body"
        elif not self.served:
            deadline, why = self.idle_since + limits.first_request_timeout_s, ""
        else:
            deadline, why = self.idle_since + self.keep_alive_timeout, ""
        if now < deadline:
            self._arm(deadline)
        elif why:
            self._refuse(
                408,
                orjson.dumps({"error": f"the request's {why} did not arrive in time"}),
                b"application/json",
            )
        else:
            self.transport.close()


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a request that was refused."""
