"""gRPC over opserve's HTTP/2 (`http2.py`): calls, length-prefixed messages, statuses.

The gRPC wire protocol (grpc/doc/PROTOCOL-HTTP2.md): a call is an HTTP/2 stream whose `:path`
names the method; each message is a 5-byte prefix (compressed flag, length) and a serialized
protobuf; the answer is response headers, messages and trailers carrying `grpc-status` and
`grpc-message` (or, for an error before any message, the trailers alone). `grpc-timeout` sets
the call's deadline; `grpc-encoding` says how the client compressed its messages (gzip and
deflate are read), `grpc-accept-encoding` what it can read of ours.

A `Method` is a handler of the servicer's shape: `async handler(request, context)` returning the
response (unary), or an async generator of responses given an async iterator of requests
(bidirectional streaming). `CallContext` is what a handler may ask: the call's metadata, and
`abort` to end it with a status.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import functools
import logging
import struct
import urllib.parse
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from opserve.frontends.access import GRPC_CATEGORIES, Restriction, refusal
from opserve.frontends.grpc.http2 import STATUS_200, Stream, encode_literal
from opserve.memo import remember

log = logging.getLogger(__name__)


class Status(enum.IntEnum):
    """gRPC status codes."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class CallError(Exception):
    """Ends a call with a status (what `CallContext.abort` raises)."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class CallContext:
    """What a handler sees of its call."""

    __slots__ = ("metadata", "on_cancel")

    def __init__(self, metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        self.metadata = metadata
        # called when the client resets the call's stream, for a call taken by
        # `Method.answer_now` (a task is cancelled instead): queued, it is dropped; running,
        # the model is told
        self.on_cancel: Callable[[], None] | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self.metadata

    async def abort(self, status: Status, message: str) -> NoReturn:
        raise CallError(status, message)


@dataclass(frozen=True)
class Method:
    name: str
    request_type: Any  # a protobuf message class
    handler: Callable[..., Any]
    streaming: bool  # bidirectional streaming (ModelStreamInfer); else unary
    # a unary method's task-free way: `answer_now(message, context, done)` starts the call from
    # the request message's bytes (valid during the call only) and calls `done` later with the
    # response or a `CallError`; False when it cannot (the message is then parsed, and the
    # handler runs in a task)
    answer_now: Callable[[memoryview | bytes, CallContext, Callable[[Any], None]], bool] | None = (
        None
    )


CONTENT_TYPE = encode_literal(b"content-type", b"application/grpc")
RESPONSE_HEADERS = STATUS_200 + CONTENT_TYPE
GZIP_HEADERS = RESPONSE_HEADERS + encode_literal(b"grpc-encoding", b"gzip")
OK_TRAILERS = encode_literal(b"grpc-status", b"0")
_PREFIX = struct.Struct(">BI")
_JOIN_BYTES = 16_384  # a streamed message this small is joined into one DATA frame
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
# metadata that is the protocol's own, not the call's
_RESERVED = frozenset(
    ("te", "content-type", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding")
)
# --grpc-infer-response-compression-level: zlib levels of gzip
COMPRESSION_LEVELS = {"none": None, "low": 1, "medium": 6, "high": 9}


def status_block(status: Status, message: str) -> bytes:
    block = encode_literal(b"grpc-status", str(int(status)).encode())
    if message:
        # percent-encoded as the protocol asks; grpc core decodes it for the client
        encoded = urllib.parse.quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")
        block += encode_literal(b"grpc-message", encoded.encode())
    return block


def serialized_parts(response: Any) -> list[bytes | memoryview]:
    """A protobuf message's serialization; for an object that offers `serialized_parts` (a
    response holding large byte strings), its parts."""
    parts = getattr(response, "serialized_parts", None)
    return parts() if parts is not None else [response.SerializeToString()]


def parse_timeout(value: str) -> float | None:
    """`grpc-timeout` (an integer of at most 8 digits and a unit) in seconds; None if malformed."""
    digits, unit = value[:-1], value[-1:]
    if not digits.isdigit() or len(digits) > 8 or unit not in _TIMEOUT_UNITS:
        return None
    return int(digits) * _TIMEOUT_UNITS[unit]


def _decompress(data: bytes, encoding: str, limit: int | None) -> bytes:
    """A compressed request message inflated, up to `limit` bytes; data that does not
    inflate ends the call (INTERNAL, as gRPC's own servers answer), not the connection."""
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(data, limit or 0)
    except zlib.error as exc:
        raise CallError(
            Status.INTERNAL, f"could not decompress the request message ({encoding}): {exc}"
        ) from None
    if inflater.unconsumed_tail:
        raise CallError(
            Status.RESOURCE_EXHAUSTED,
            f"Received message larger than max (more than {limit} bytes once decompressed)",
        )
    if not inflater.eof or inflater.unused_data:
        raise CallError(
            Status.INTERNAL,
            f"could not decompress the request message ({encoding}): "
            + ("it has data after its end" if inflater.eof else "it ends before its end"),
        )
    return out


class Call:
    """One call on one stream."""

    __slots__ = (
        "stream",
        "method",
        "context",
        "encoding",
        "gzip_level",
        "body",
        "requests",
        "task",
        "deadline",
        "expired",
        "started",
        "answering",
    )

    def __init__(
        self,
        stream: Stream,
        method: Method,
        context: CallContext,
        encoding: str,
        gzip_level: int | None,
    ) -> None:
        self.stream = stream
        self.method = method
        self.context = context
        self.encoding = encoding
        self.gzip_level = gzip_level  # compress responses at this level; None: do not
        self.body = bytearray()
        self.requests: asyncio.Queue[Any] | None = None
        self.task: asyncio.Task[None] | None = None
        self.deadline: asyncio.TimerHandle | None = None
        self.expired = False
        self.started = False  # response headers sent
        self.answering = False  # a unary call taken by its method's `answer_now`

    def message(self, response: Any) -> list[bytes | memoryview]:
        """The response as a length-prefixed message, in parts that follow one another (a
        response that serializes itself in parts keeps its large tensors out of any copy)."""
        parts = serialized_parts(response)
        if self.gzip_level is not None:
            compressor = zlib.compressobj(self.gzip_level, zlib.DEFLATED, 31)
            payload = compressor.compress(b"".join(parts)) + compressor.flush()
            return [_PREFIX.pack(1, len(payload)), payload]
        return [_PREFIX.pack(0, sum(map(len, parts))), *parts]

    @property
    def headers(self) -> bytes:
        return GZIP_HEADERS if self.gzip_level is not None else RESPONSE_HEADERS

    def finish(self, status: Status, message: str) -> None:
        """Trailers; alone (trailers-only) when no response headers were sent."""
        if self.deadline is not None:
            self.deadline.cancel()
        block = status_block(status, message)
        if not self.started:
            block = RESPONSE_HEADERS + block
        self.stream.send_headers(block, end=True)


# a call's headers as read: path, content-type, grpc-encoding, grpc-accept-encoding,
# grpc-timeout, and its metadata (binary values decoded)
_ReadHeaders = tuple[str, str, str, str, str, tuple[tuple[str, str | bytes], ...]]
READ_HEADERS = 64  # header lists remembered as read (the oldest forgotten first)


def _read_headers(headers: tuple[tuple[str, str], ...]) -> _ReadHeaders:
    path = content_type = encoding = accept = timeout = ""
    metadata: list[tuple[str, str | bytes]] = []
    for name, value in headers:
        if name.startswith(":"):
            if name == ":path":
                path = value
        elif name == "content-type":
            content_type = value
        elif name == "grpc-encoding":
            encoding = value
        elif name == "grpc-accept-encoding":
            accept = value
        elif name == "grpc-timeout":
            timeout = value
        elif name not in _RESERVED:
            if name.endswith("-bin"):
                metadata.append((name, _unbase64(value)))
            else:
                metadata.append((name, value))
    return path, content_type, encoding, accept, timeout, tuple(metadata)


class GrpcCalls:
    """The `StreamHandler` of every gRPC connection: routes streams to methods."""

    def __init__(
        self,
        methods: dict[str, Method],
        compression: str = "none",
        restrictions: dict[str, Restriction] | None = None,
        max_message_bytes: int | None = None,
    ) -> None:
        self.methods = methods
        self.gzip_level = COMPRESSION_LEVELS[compression]
        self.restrictions = restrictions or {}
        self.max_message_bytes = max_message_bytes
        self.calls: set[Call] = set()
        self._read_headers: dict[tuple[tuple[str, str], ...], _ReadHeaders] = {}

    # StreamHandler ---------------------------------------------------------------------
    def on_headers(self, stream: Stream, headers: tuple[tuple[str, str], ...], end: bool) -> None:
        read = self._read_headers.get(headers)  # a client sends the same headers call after call
        if read is None:
            read = _read_headers(headers)
            remember(self._read_headers, headers, read, READ_HEADERS)
        path, content_type, encoding, accept, timeout, metadata = read
        if not content_type.startswith("application/grpc"):
            stream.send_headers(
                encode_literal(b":status", b"415")
                + CONTENT_TYPE
                + status_block(
                    Status.INTERNAL, f"invalid gRPC request content-type '{content_type}'"
                ),
                end=True,
            )
            return
        method = self.methods.get(path)
        if method is None:
            self._refuse(stream, Status.UNIMPLEMENTED, f"Method not found: {path}")
            return
        method_name = method.name
        if self.restrictions:
            refused = refusal(
                self.restrictions,
                GRPC_CATEGORIES.get(method_name, "metadata"),
                ((k, v) for k, v in metadata if isinstance(v, str)),
                "protocol",
            )
            if refused is not None:
                self._refuse(stream, Status.PERMISSION_DENIED, refused)
                return
        if encoding not in ("", "identity", "gzip", "deflate"):
            self._refuse(
                stream, Status.UNIMPLEMENTED, f"Compression algorithm '{encoding}' not supported"
            )
            return
        gzip_level = self.gzip_level if self.gzip_level is not None and "gzip" in accept else None
        call = Call(stream, method, CallContext(metadata), encoding, gzip_level)
        stream.handler_state = call
        self.calls.add(call)
        if timeout:
            seconds = parse_timeout(timeout)
            if seconds is not None:
                call.deadline = asyncio.get_running_loop().call_later(seconds, self._expire, call)
        if method.streaming:
            call.requests = asyncio.Queue()
            call.task = asyncio.ensure_future(self._stream(call))
            call.task.add_done_callback(functools.partial(self._task_done, call))
            if end:
                call.requests.put_nowait(None)
        elif end:
            self._end_call(call, Status.INTERNAL, "the call ended without a request message")

    def on_data(self, stream: Stream, data: memoryview, end: bool) -> None:
        call = stream.handler_state
        if not isinstance(call, Call):
            return
        body = call.body
        try:
            if body:
                body += data
                self._messages(call, memoryview(body), end)
            else:
                self._messages(call, data, end)
        except CallError as exc:
            self._end_call(call, exc.status, exc.message)

    def on_reset(self, stream: Stream) -> None:
        call = stream.handler_state
        if isinstance(call, Call):
            if call.context.on_cancel is not None:
                call.context.on_cancel()
                call.context.on_cancel = None
            if call.task is not None:
                call.task.cancel()
            if call.deadline is not None:
                call.deadline.cancel()
            self.calls.discard(call)

    # messages --------------------------------------------------------------------------
    def _messages(self, call: Call, view: memoryview, end: bool) -> None:
        """Take every complete message out of `view` (the call's body, or the frame's data);
        keep the rest in the body."""
        offset, size = 0, len(view)
        limit = self.max_message_bytes
        while size - offset >= 5:
            compressed, length = _PREFIX.unpack_from(view, offset)
            if limit is not None and length > limit:
                raise CallError(
                    Status.RESOURCE_EXHAUSTED,
                    f"Received message larger than max ({length} vs. {limit}); "
                    "--grpc-max-input-size sets the limit",
                )
            if size - offset - 5 < length:
                break
            payload = view[offset + 5 : offset + 5 + length]
            offset += 5 + length
            try:
                self._message(call, payload, bool(compressed))
            finally:
                payload.release()  # the body may be resized below
            if (call.task is not None or call.answering) and not call.method.streaming:
                break  # a unary call takes one message; more are ignored
        body = call.body
        if view.obj is body:
            view.release()
            del body[:offset]
        elif offset < size:
            body += view[offset:]
        if end:
            if call.method.streaming:
                assert call.requests is not None
                call.requests.put_nowait(None)
            elif call.task is None and not call.answering:
                if body:
                    raise CallError(Status.INTERNAL, "the request message ended early")
                raise CallError(Status.INTERNAL, "the call ended without a request message")

    def _message(self, call: Call, payload: memoryview, compressed: bool) -> None:
        data: bytes | memoryview = payload
        if compressed:
            if call.encoding in ("", "identity"):
                raise CallError(
                    Status.INTERNAL, "a compressed message without a grpc-encoding header"
                )
            data = _decompress(bytes(payload), call.encoding, self.max_message_bytes)
        method = call.method
        if method.streaming or call.task is None and not call.answering:
            now = method.answer_now
            if (
                now is not None
                and not method.streaming
                and call.deadline is None
                and now(data, call.context, functools.partial(self._answered, call))
            ):
                call.answering = True
                return
            try:
                request = method.request_type.FromString(data)
            except Exception as exc:  # protobuf's DecodeError
                raise CallError(
                    Status.INTERNAL, f"could not parse the request message: {exc}"
                ) from None
            if method.streaming:
                assert call.requests is not None
                call.requests.put_nowait(request)
            else:
                call.task = asyncio.ensure_future(self._unary(call, request))
                call.task.add_done_callback(functools.partial(self._task_done, call))

    # running ---------------------------------------------------------------------------
    async def _unary(self, call: Call, request: Any) -> None:
        try:
            response = await call.method.handler(request, call.context)
        except CallError as exc:
            self._end_call(call, exc.status, exc.message)
        except asyncio.CancelledError:
            if call.expired:
                self._end_call(call, Status.DEADLINE_EXCEEDED, "Deadline Exceeded")
        except Exception as exc:  # a bug: the client gets its text, the log its traceback
            log.exception("gRPC %s failed", call.method.name)
            self._end_call(call, Status.INTERNAL, f"{type(exc).__name__}: {exc}")
        else:
            self._respond(call, response)

    def _answered(self, call: Call, outcome: Any) -> None:
        """What `Method.answer_now` started has its answer: the response, or a `CallError`."""
        # nothing to cancel any more; what it holds would keep a cycle through this call
        call.context.on_cancel = None
        if call not in self.calls:  # the client reset the stream meanwhile
            return
        if isinstance(outcome, CallError):
            self._end_call(call, outcome.status, outcome.message)
            return
        try:
            self._respond(call, outcome)
        except Exception as exc:  # a bug: the client gets its text, the log its traceback
            log.exception("gRPC %s failed", call.method.name)
            self._end_call(call, Status.INTERNAL, f"{type(exc).__name__}: {exc}")

    def _respond(self, call: Call, response: Any) -> None:
        if call.deadline is not None:
            call.deadline.cancel()
        call.stream.send_response(call.headers, call.message(response), OK_TRAILERS)
        self.calls.discard(call)

    async def _stream(self, call: Call) -> None:
        status, message = Status.OK, ""
        try:
            async for response in call.method.handler(_requests(call), call.context):
                if not call.started:
                    call.started = True
                    call.stream.send_headers(call.headers)
                parts = call.message(response)
                if sum(map(len, parts)) <= _JOIN_BYTES:
                    call.stream.send_data(b"".join(parts))  # one frame for a small message
                else:
                    for part in parts:
                        call.stream.send_data(part)
        except CallError as exc:
            status, message = exc.status, exc.message
        except asyncio.CancelledError:
            if not call.expired:
                return
            status, message = Status.DEADLINE_EXCEEDED, "Deadline Exceeded"
        except Exception as exc:
            log.exception("gRPC %s failed", call.method.name)
            status, message = Status.INTERNAL, f"{type(exc).__name__}: {exc}"
        call.finish(status, message)

    def _expire(self, call: Call) -> None:
        """The call's deadline passed: its running handler is cancelled and answers
        DEADLINE_EXCEEDED; a call still waiting for its request message is answered so now."""
        call.expired = True
        if call.task is not None:
            call.task.cancel()
        elif not call.answering and call in self.calls:
            self._end_call(call, Status.DEADLINE_EXCEEDED, "Deadline Exceeded")

    def _task_done(self, call: Call, task: asyncio.Task[None]) -> None:
        """A handler's task ended. One cancelled before its first step (a deadline that passed
        at once: `grpc-timeout: 0S`) never ran the code that answers: it is answered here."""
        if task.cancelled() and call.expired and call in self.calls:
            call.finish(Status.DEADLINE_EXCEEDED, "Deadline Exceeded")
        self.calls.discard(call)

    def _end_call(self, call: Call, status: Status, message: str) -> None:
        call.stream.handler_state = None  # what arrives for it from now on is dropped
        call.finish(status, message)
        if (
            call.task is not None
            and not call.task.done()
            and call.task is not asyncio.current_task()
        ):
            call.task.cancel()
        self.calls.discard(call)

    def _refuse(self, stream: Stream, status: Status, message: str) -> None:
        stream.send_headers(RESPONSE_HEADERS + status_block(status, message), end=True)


async def _requests(call: Call) -> AsyncIterator[Any]:
    assert call.requests is not None
    while True:
        request = await call.requests.get()
        if request is None:
            return
        yield request


def _unbase64(value: str) -> bytes:
    padded = value + "=" * (-len(value) % 4)
    try:
        return base64.b64decode(padded)
    except ValueError:
        return value.encode()
