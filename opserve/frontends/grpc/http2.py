"""The server side of HTTP/2 (RFC 9113), as much of it as gRPC uses.

`Http2Connection` is an asyncio protocol: it reads frames, keeps the flow-control windows of
both directions, decodes request headers with HPACK (the `hpack` package) and hands each
stream to a `StreamHandler`: its headers, its data as it arrives, its end, its reset. Answers
go out through `Stream.send_headers` / `send_data` / `send_trailers`, which frame them and
write them at once when the peer's windows allow, or keep them until a WINDOW_UPDATE does.

What it leaves out, since gRPC never needs it: server push, priorities (read and ignored),
HTTP/1.1 upgrades. Response headers are encoded without the dynamic table (literals that are
never indexed, or static-table entries), so the encoder keeps no state.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

import hpack

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# frame types
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9

# flags
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# error codes
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
ENHANCE_YOUR_CALM = 0xB

# settings
HEADER_TABLE_SIZE = 0x1
ENABLE_PUSH = 0x2
MAX_CONCURRENT_STREAMS = 0x3
INITIAL_WINDOW_SIZE = 0x4
MAX_FRAME_SIZE = 0x5
MAX_HEADER_LIST_SIZE = 0x6

DEFAULT_WINDOW = 65_535
DEFAULT_MAX_FRAME = 16_384
MAX_WINDOW = 2**31 - 1

# What we read: large windows, so that a request's data never waits for a WINDOW_UPDATE of
# ours, and updates are rare (sent once half a window has been consumed).
RECEIVE_WINDOW = 16 * 1024 * 1024
MAX_HEADER_BLOCK = 1024 * 1024  # a header block larger than this is a protocol error

_HEADER = struct.Struct(">I B I")  # (length << 8 | type), flags, stream id; see _frame_header
_SETTING = struct.Struct(">HI")


def frame_header(length: int, kind: int, flags: int, stream_id: int) -> bytes:
    return _HEADER.pack((length << 8) | kind, flags, stream_id)


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return frame_header(len(payload), kind, flags, stream_id) + payload


def encode_literal(name: bytes, value: bytes) -> bytes:
    """One header as a literal that is never indexed, with a new name (RFC 7541 6.2.3)."""
    return b"\x10" + _string(name) + _string(value)


def _string(value: bytes) -> bytes:
    return _integer(len(value), 7, 0) + value


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """HPACK's integer with an N-bit prefix (RFC 7541 5.1); `first` holds the prefix's flags."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


STATUS_200 = b"\x88"  # ':status: 200', static table index 8


class ConnectionError_(Exception):
    """A connection error (RFC 9113 5.4.1): the connection ends with GOAWAY and this code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class StreamHandler(Protocol):
    """What a connection tells about each of its streams; implemented by the gRPC layer."""

    def on_headers(self, stream: Stream, headers: tuple[tuple[str, str], ...], end: bool) -> None:
        """A stream's request headers, decoded (equal blocks give equal tuples)."""
        ...

    def on_data(self, stream: Stream, data: memoryview, end: bool) -> None: ...

    def on_reset(self, stream: Stream) -> None: ...


@dataclass
class KeepaliveSettings:
    """Triton's --grpc-keepalive-* and --grpc-http2-* flags (gRPC core's meanings), in ms."""

    time_ms: int = 7_200_000
    timeout_ms: int = 20_000
    permit_without_calls: bool = False
    max_pings_without_data: int = 2
    min_recv_ping_interval_without_data_ms: int = 300_000
    max_ping_strikes: int = 2
    max_connection_age_ms: int | None = None
    max_connection_age_grace_ms: int | None = None


class Stream:
    """One request stream: what the peer may still send, what we may still send."""

    __slots__ = (
        "id",
        "connection",
        "send_window",
        "pending",
        "received",
        "remote_closed",
        "local_closed",
        "handler_state",
    )

    def __init__(self, stream_id: int, connection: Http2Connection, send_window: int) -> None:
        self.id = stream_id
        self.connection = connection
        self.send_window = send_window
        self.pending: list[tuple[int, memoryview | bytes]] = []  # (kind, payload) held back
        self.received = 0  # data bytes not yet acknowledged by a stream WINDOW_UPDATE
        self.remote_closed = False
        self.local_closed = False
        self.handler_state: object = None  # the gRPC layer's call

    def send_headers(self, block: bytes, end: bool = False) -> None:
        self.connection.send_headers(self, block, end)

    def send_data(self, data: bytes | memoryview, end: bool = False) -> None:
        self.connection.send_data(self, data, end)

    def send_response(
        self, headers: bytes, message: list[bytes | memoryview], trailers: bytes
    ) -> None:
        """Headers, one data payload (in parts that follow one another) and trailers: one
        write when the windows allow."""
        self.connection.send_response(self, headers, message, trailers)

    def reset(self, code: int = CANCEL) -> None:
        self.connection.reset_stream(self, code)


_PENDING_DATA, _PENDING_TRAILERS = 0, 1


class Http2Connection(asyncio.Protocol):
    """One client connection (server side)."""

    def __init__(
        self,
        handler: StreamHandler,
        keepalive: KeepaliveSettings,
        on_close: Callable[[Http2Connection], None] | None = None,
        preface_timeout: float | None = None,
        refuse: str = "",
    ) -> None:
        self.handler = handler
        self.keepalive = keepalive
        self.preface_timeout = preface_timeout  # a client silent this long is dropped
        self.refuse = refuse  # why the connection is refused at once (too many of them)
        self.on_close = on_close
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.preface_seen = False
        self.streams: dict[int, Stream] = {}
        self.last_stream_id = 0
        self.decoder = hpack.Decoder()
        self.decoder.max_allowed_table_size = 4096
        self.header_block: bytearray | None = None  # HEADERS awaiting CONTINUATION
        self.header_stream = 0
        self.header_end_stream = False
        # what the peer lets us send
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = DEFAULT_MAX_FRAME
        self.send_window = DEFAULT_WINDOW
        self.blocked: dict[int, Stream] = {}  # streams with data held back, in order
        # what we let the peer send
        self.received = 0  # connection-level data bytes not yet acknowledged
        self.going_away = False
        self.closed = False
        # keepalive and ping policing (gRPC core's rules)
        self.ping_strikes = 0
        self.last_ping_received = 0.0
        self.pings_without_data = 0
        self.ping_outstanding = False
        self.keepalive_timer: asyncio.TimerHandle | None = None
        # writes wait in the outbox until the loop's current callbacks have run, so that the
        # answers of a batch (which wake their calls together) leave in one system call
        self.outbox: list[bytes | memoryview] = []
        # decoded header blocks made of indexed fields only: such a block leaves the dynamic
        # table as it is, so while the table does not change, the same bytes mean the same
        # headers (a gRPC client's block after its first call: 8 bytes, the same each time)
        self.indexed_blocks: dict[bytes, tuple[tuple[str, str], ...]] = {}
        self.age_timer: asyncio.TimerHandle | None = None

    # connection life ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        if self.refuse:
            self.close(ENHANCE_YOUR_CALM, self.refuse)
            return
        settings = b"".join(
            _SETTING.pack(key, value)
            for key, value in (
                (ENABLE_PUSH, 0),
                (INITIAL_WINDOW_SIZE, RECEIVE_WINDOW),
                (MAX_FRAME_SIZE, DEFAULT_MAX_FRAME),
                (MAX_HEADER_LIST_SIZE, MAX_HEADER_BLOCK),
            )
        )
        transport.write(
            frame(SETTINGS, 0, 0, settings)
            + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", RECEIVE_WINDOW - DEFAULT_WINDOW))
        )
        loop = asyncio.get_running_loop()
        if self.preface_timeout is not None:
            self.age_timer = loop.call_later(self.preface_timeout, self._silent)
        if self.keepalive.time_ms > 0:
            self.keepalive_timer = loop.call_later(self.keepalive.time_ms / 1000, self._keepalive)
        self._age_limit()

    def _age_limit(self) -> None:
        if self.keepalive.max_connection_age_ms is not None:
            self.age_timer = asyncio.get_running_loop().call_later(
                self.keepalive.max_connection_age_ms / 1000, self._too_old
            )
        else:
            self.age_timer = None

    def _silent(self) -> None:
        """No connection preface in time (a slow or idle client holding a connection)."""
        if not self.preface_seen:
            self.close(PROTOCOL_ERROR, "no connection preface in time")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for timer in (self.keepalive_timer, self.age_timer):
            if timer is not None:
                timer.cancel()
        streams, self.streams = self.streams, {}
        self.blocked.clear()
        for stream in streams.values():
            if not (stream.remote_closed and stream.local_closed):
                self.handler.on_reset(stream)
            self._forget(stream)
        if self.on_close is not None:
            self.on_close(self)

    def close(self, code: int = NO_ERROR, reason: str = "") -> None:
        """GOAWAY and close at once (a connection error, or the server stopping hard)."""
        if self.transport is not None and not self.closed:
            self._goaway(code, reason)
            self._send_outbox()
            self.transport.close()
            self.closed = True

    def shutdown(self) -> None:
        """Graceful: no new streams (GOAWAY); close once the open streams are answered."""
        if self.closed or self.going_away:
            return
        self.going_away = True
        self._goaway(NO_ERROR, "")
        self._close_if_done()

    def _goaway(self, code: int, reason: str) -> None:
        payload = struct.pack(">II", self.last_stream_id, code) + reason.encode()[:256]
        self._write(frame(GOAWAY, 0, 0, payload))

    def _close_if_done(self) -> None:
        if self.going_away and not self.streams and self.transport is not None:
            self._send_outbox()
            self.transport.close()
            self.closed = True

    def _reset_ping_clock(self) -> None:
        """We are sending headers, data or a WINDOW_UPDATE: as gRPC core does then, the
        client's pings so far are forgiven (strikes, and the time of its last ping), and our
        keepalive may ping again without data. A client that receives a large answer pings
        while it reads (BDP probes); its pings count only where no data flows."""
        self.ping_strikes = 0
        self.last_ping_received = 0.0
        self.pings_without_data = 0

    # reading -----------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        try:
            if not self.preface_seen:
                if len(buffer) < len(PREFACE):
                    if not PREFACE.startswith(bytes(buffer)):
                        raise ConnectionError_(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                    return
                if buffer[: len(PREFACE)] != PREFACE:
                    raise ConnectionError_(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                self.preface_seen = True
                del buffer[: len(PREFACE)]
                if self.preface_timeout is not None and self.age_timer is not None:
                    self.age_timer.cancel()
                    self._age_limit()
            view = memoryview(buffer)
            offset = 0
            size = len(buffer)
            try:
                while size - offset >= 9:
                    word, flags, stream_id = _HEADER.unpack_from(view, offset)
                    length = word >> 8
                    if length > DEFAULT_MAX_FRAME:
                        raise ConnectionError_(FRAME_SIZE_ERROR, "frame larger than allowed")
                    end = offset + 9 + length
                    if end > size:
                        break
                    self._frame(word & 0xFF, flags, stream_id & MAX_WINDOW, view[offset + 9 : end])
                    offset = end
                    if self.closed:
                        return
            finally:
                view.release()
            if offset:
                del buffer[:offset]
        except ConnectionError_ as exc:
            log.debug("HTTP/2 connection error: %s", exc.reason)
            self.close(exc.code, exc.reason)

    def _frame(self, kind: int, flags: int, stream_id: int, payload: memoryview) -> None:
        if self.header_block is not None and kind != CONTINUATION:
            raise ConnectionError_(PROTOCOL_ERROR, "expected CONTINUATION")
        if kind == DATA:
            self._data(flags, stream_id, payload)
        elif kind == HEADERS:
            self._headers(flags, stream_id, payload)
        elif kind == CONTINUATION:
            self._continuation(flags, stream_id, payload)
        elif kind == WINDOW_UPDATE:
            self._window_update(stream_id, payload)
        elif kind == PING:
            self._ping(flags, stream_id, payload)
        elif kind == SETTINGS:
            self._settings(flags, stream_id, payload)
        elif kind == RST_STREAM:
            if stream_id == 0 or len(payload) != 4:
                raise ConnectionError_(PROTOCOL_ERROR, "bad RST_STREAM")
            stream = self.streams.pop(stream_id, None)
            self.blocked.pop(stream_id, None)
            if stream is not None:
                stream.remote_closed = stream.local_closed = True
                self.handler.on_reset(stream)
                self._forget(stream)
                self._close_if_done()
        elif kind == GOAWAY:
            self.going_away = True
            self._close_if_done()
        elif kind == PUSH_PROMISE:
            raise ConnectionError_(PROTOCOL_ERROR, "a client cannot push")
        elif kind == PRIORITY:
            if stream_id == 0 or len(payload) != 5:
                raise ConnectionError_(PROTOCOL_ERROR, "bad PRIORITY")
        # other frame types are ignored (RFC 9113 5.5)

    def _data(self, flags: int, stream_id: int, payload: memoryview) -> None:
        if stream_id == 0:
            raise ConnectionError_(PROTOCOL_ERROR, "DATA on stream 0")
        length = len(payload)
        if flags & PADDED:
            payload = _unpad(payload)
        self.received += length
        if self.received >= RECEIVE_WINDOW // 2:
            self._write(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self.received)))
            self.received = 0
            self._reset_ping_clock()
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed:
            if stream_id > self.last_stream_id:
                raise ConnectionError_(PROTOCOL_ERROR, "DATA on an idle stream")
            if stream is not None:
                self.reset_stream(stream, STREAM_CLOSED)
            return  # a stream we reset or finished: counted, then dropped
        end = bool(flags & END_STREAM)
        stream.received += length
        if not end and stream.received >= RECEIVE_WINDOW // 2:
            self._write(frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">I", stream.received)))
            stream.received = 0
            self._reset_ping_clock()
        if end:
            stream.remote_closed = True
        self.handler.on_data(stream, payload, end)
        if end:
            self._forget_if_done(stream)

    def _headers(self, flags: int, stream_id: int, payload: memoryview) -> None:
        if stream_id == 0:
            raise ConnectionError_(PROTOCOL_ERROR, "HEADERS on stream 0")
        if flags & PADDED:
            payload = _unpad(payload)
        if flags & PRIORITY_FLAG:
            payload = payload[5:]
        self.header_stream = stream_id
        self.header_end_stream = bool(flags & END_STREAM)
        if flags & END_HEADERS:
            self._header_block(bytes(payload))
        else:
            self.header_block = bytearray(payload)

    def _continuation(self, flags: int, stream_id: int, payload: memoryview) -> None:
        if self.header_block is None or stream_id != self.header_stream:
            raise ConnectionError_(PROTOCOL_ERROR, "unexpected CONTINUATION")
        self.header_block += payload
        if len(self.header_block) > MAX_HEADER_BLOCK:
            raise ConnectionError_(ENHANCE_YOUR_CALM, "header block too large")
        if flags & END_HEADERS:
            block, self.header_block = bytes(self.header_block), None
            self._header_block(block)

    def _header_block(self, block: bytes) -> None:
        indexed = bool(block) and min(block) >= 0x80 and 0xFF not in block
        headers = self.indexed_blocks.get(block) if indexed else None
        malformed = False
        if headers is None:
            try:
                headers = tuple(cast(list[tuple[str, str]], self.decoder.decode(block)))
            except Exception as exc:  # hpack's errors: the decoder's state is lost
                raise ConnectionError_(COMPRESSION_ERROR, f"bad header block: {exc}") from None
            # a header without a name makes the request malformed (RFC 9113, 8.2.1)
            malformed = any(not name for name, _ in headers)
            if not indexed:
                self.indexed_blocks.clear()  # the table may have changed
            elif len(self.indexed_blocks) < 64 and not malformed:
                self.indexed_blocks[block] = headers
        stream_id, end = self.header_stream, self.header_end_stream
        stream = self.streams.get(stream_id)
        if malformed:  # a stream error: that stream is reset, the connection's others go on
            if stream is not None:
                self.handler.on_reset(stream)
                self.reset_stream(stream, PROTOCOL_ERROR)
            elif stream_id > self.last_stream_id and stream_id % 2 == 1:
                self.last_stream_id = stream_id
                self._write(frame(RST_STREAM, 0, stream_id, struct.pack(">I", PROTOCOL_ERROR)))
            return
        if stream is None:
            if stream_id <= self.last_stream_id or stream_id % 2 == 0:
                # trailers or a reused id on a stream we already closed: answer it as closed
                self._write(frame(RST_STREAM, 0, stream_id, struct.pack(">I", STREAM_CLOSED)))
                return
            self.last_stream_id = stream_id
            if self.going_away:
                self._write(frame(RST_STREAM, 0, stream_id, struct.pack(">I", REFUSED_STREAM)))
                return
            stream = Stream(stream_id, self, self.peer_initial_window)
            self.streams[stream_id] = stream
            if end:
                stream.remote_closed = True
            self.handler.on_headers(stream, headers, end)
        else:  # trailers from the client
            if not end:
                raise ConnectionError_(PROTOCOL_ERROR, "trailers without END_STREAM")
            stream.remote_closed = True
            self.handler.on_data(stream, memoryview(b""), True)
        self._forget_if_done(stream)

    def _window_update(self, stream_id: int, payload: memoryview) -> None:
        if len(payload) != 4:
            raise ConnectionError_(FRAME_SIZE_ERROR, "bad WINDOW_UPDATE")
        increment = int.from_bytes(payload, "big") & MAX_WINDOW
        if stream_id == 0:
            if increment == 0:
                raise ConnectionError_(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise ConnectionError_(FLOW_CONTROL_ERROR, "window too large")
            self._flush_blocked()
            return
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.send_window += increment
            if stream.pending:
                self._flush(stream)

    def _ping(self, flags: int, stream_id: int, payload: memoryview) -> None:
        if stream_id != 0 or len(payload) != 8:
            raise ConnectionError_(PROTOCOL_ERROR, "bad PING")
        if flags & ACK:
            self.ping_outstanding = False
            return
        now = time.monotonic()
        interval = self.keepalive.min_recv_ping_interval_without_data_ms / 1000
        if not self.streams and not self.keepalive.permit_without_calls:
            interval = max(interval, 7200.0)  # gRPC core: idle connections may ping every 2 h
        if self.last_ping_received and now - self.last_ping_received < interval:
            self.ping_strikes += 1
            if self.ping_strikes > self.keepalive.max_ping_strikes > 0:
                raise ConnectionError_(ENHANCE_YOUR_CALM, "too_many_pings")
        self.last_ping_received = now
        self._write(frame(PING, ACK, 0, bytes(payload)))

    def _settings(self, flags: int, stream_id: int, payload: memoryview) -> None:
        if stream_id != 0:
            raise ConnectionError_(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            return
        if len(payload) % 6:
            raise ConnectionError_(FRAME_SIZE_ERROR, "bad SETTINGS")
        for offset in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, offset)
            if key == INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ConnectionError_(FLOW_CONTROL_ERROR, "initial window too large")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
            elif key == MAX_FRAME_SIZE:
                if not DEFAULT_MAX_FRAME <= value <= 16_777_215:
                    raise ConnectionError_(PROTOCOL_ERROR, "bad SETTINGS_MAX_FRAME_SIZE")
                self.peer_max_frame = value
            elif key == HEADER_TABLE_SIZE:
                pass  # our encoder never uses the dynamic table
        self._write(frame(SETTINGS, ACK, 0))
        self._flush_blocked()

    # writing -----------------------------------------------------------------------------
    def _write(self, data: bytes | memoryview) -> None:
        if not self.outbox:
            asyncio.get_running_loop().call_soon(self._send_outbox)
        self.outbox.append(data)

    def _send_outbox(self) -> None:
        outbox = self.outbox
        if not outbox:
            return
        self.outbox = []
        if self.transport is not None and not self.closed:
            if len(outbox) == 1:
                self.transport.write(outbox[0])
            else:
                self.transport.writelines(outbox)

    def _header_frames(self, stream_id: int, block: bytes, end: bool) -> bytes:
        limit = self.peer_max_frame
        flags = END_STREAM if end else 0
        if len(block) <= limit:
            return frame_header(len(block), HEADERS, flags | END_HEADERS, stream_id) + block
        parts = [block[i : i + limit] for i in range(0, len(block), limit)]
        out = [frame(HEADERS, flags, stream_id, parts[0])]
        for index, part in enumerate(parts[1:], 1):
            last = index == len(parts) - 1
            out.append(frame(CONTINUATION, END_HEADERS if last else 0, stream_id, part))
        return b"".join(out)

    def send_headers(self, stream: Stream, block: bytes, end: bool) -> None:
        if stream.local_closed or self.closed:
            return
        self._reset_ping_clock()
        if end:
            if stream.pending:  # trailers wait behind data held back
                stream.pending.append((_PENDING_TRAILERS, block))
                return
            stream.local_closed = True
        self._write(self._header_frames(stream.id, block, end))
        if end:
            self._forget_if_done(stream)

    def send_data(self, stream: Stream, data: bytes | memoryview, end: bool) -> None:
        if stream.local_closed or self.closed:
            return
        self._reset_ping_clock()
        stream.pending.append((_PENDING_DATA, data))
        self._flush(stream)
        if end:
            self.send_headers_end(stream)

    def send_headers_end(self, stream: Stream) -> None:
        """An empty DATA frame with END_STREAM (after any data held back)."""
        stream.pending.append((_PENDING_TRAILERS, b""))
        self._flush(stream)

    def send_response(
        self, stream: Stream, headers: bytes, message: list[bytes | memoryview], trailers: bytes
    ) -> None:
        if stream.local_closed or self.closed:
            return
        length = sum(map(len, message))
        limit = self.peer_max_frame
        if (
            not stream.pending
            and length <= limit
            and length <= stream.send_window
            and length <= self.send_window
            and len(headers) <= limit
            and len(trailers) <= limit
        ):  # the common case: one write, each block in one frame
            self._reset_ping_clock()
            stream.send_window -= length
            self.send_window -= length
            stream.local_closed = True
            sid = stream.id
            self._write(
                b"".join(
                    (
                        frame_header(len(headers), HEADERS, END_HEADERS, sid),
                        headers,
                        frame_header(length, DATA, 0, sid),
                        *message,
                        frame_header(len(trailers), HEADERS, END_HEADERS | END_STREAM, sid),
                        trailers,
                    )
                )
            )
            self._forget_if_done(stream)
            return
        self.send_headers(stream, headers, False)
        for part in message:  # framed as the windows allow; the parts are not joined
            self.send_data(stream, part, False)
        self.send_headers(stream, trailers, True)

    def _flush(self, stream: Stream) -> None:
        """Write what the windows allow of what `stream` holds back."""
        out: list[bytes | memoryview] = []
        pending = stream.pending
        while pending:
            kind, payload = pending[0]
            if kind == _PENDING_TRAILERS:
                pending.pop(0)
                stream.local_closed = True
                if payload:
                    out.append(self._header_frames(stream.id, bytes(payload), True))
                else:
                    out.append(frame_header(0, DATA, END_STREAM, stream.id))
                break
            view = memoryview(payload)
            while len(view):
                allowed = min(len(view), self.peer_max_frame, stream.send_window, self.send_window)
                if allowed <= 0:
                    break
                out.append(frame_header(allowed, DATA, 0, stream.id))
                out.append(view[:allowed])
                view = view[allowed:]
                stream.send_window -= allowed
                self.send_window -= allowed
            if len(view):
                pending[0] = (kind, view)
                break
            pending.pop(0)
        if out:
            self._reset_ping_clock()
        for part in out:
            self._write(part)
        if pending:
            self.blocked[stream.id] = stream
        else:
            self.blocked.pop(stream.id, None)
            if stream.local_closed:
                self._forget_if_done(stream)

    def _flush_blocked(self) -> None:
        for stream in list(self.blocked.values()):
            if self.send_window <= 0:
                return
            self._flush(stream)

    def reset_stream(self, stream: Stream, code: int) -> None:
        if stream.id in self.streams:
            stream.remote_closed = stream.local_closed = True
            self._forget(stream)
            self._write(frame(RST_STREAM, 0, stream.id, struct.pack(">I", code)))
            self._close_if_done()

    def _forget_if_done(self, stream: Stream) -> None:
        if stream.remote_closed and stream.local_closed and not stream.pending:
            self._forget(stream)
            self._close_if_done()

    def _forget(self, stream: Stream) -> None:
        """A stream that is over leaves the connection's tables and lets go of its handler's
        state (the gRPC call refers to its stream: no reference cycle is left behind)."""
        self.streams.pop(stream.id, None)
        self.blocked.pop(stream.id, None)
        stream.handler_state = None

    # keepalive -----------------------------------------------------------------------------
    def _keepalive(self) -> None:
        """--grpc-keepalive-time: ping the client (while it has calls, unless pings without
        calls are permitted; at most --grpc-http2-max-pings-without-data in a row)."""
        if self.closed:
            return
        loop = asyncio.get_running_loop()
        settings = self.keepalive
        if (self.streams or settings.permit_without_calls) and (
            settings.max_pings_without_data == 0
            or self.pings_without_data < settings.max_pings_without_data
        ):
            self.ping_outstanding = True
            self.pings_without_data += 1
            self._write(frame(PING, 0, 0, b"opserve\0"))
            self.keepalive_timer = loop.call_later(settings.timeout_ms / 1000, self._ping_answered)
            return
        self.keepalive_timer = loop.call_later(settings.time_ms / 1000, self._keepalive)

    def _ping_answered(self) -> None:
        """--grpc-keepalive-timeout: a ping not acknowledged by now ends the connection."""
        if self.closed:
            return
        if self.ping_outstanding:
            self.close(NO_ERROR, "keepalive timeout")
            return
        self.keepalive_timer = asyncio.get_running_loop().call_later(
            self.keepalive.time_ms / 1000, self._keepalive
        )

    def _too_old(self) -> None:
        """--grpc-max-connection-age: no new streams; closed after the grace period."""
        self.shutdown()
        grace = self.keepalive.max_connection_age_grace_ms
        if grace is not None and not self.closed:
            self.age_timer = asyncio.get_running_loop().call_later(
                grace / 1000, self.close, NO_ERROR, ""
            )


def _unpad(payload: memoryview) -> memoryview:
    if not payload:
        raise ConnectionError_(PROTOCOL_ERROR, "padded frame without padding length")
    padding = payload[0]
    if padding >= len(payload):
        raise ConnectionError_(PROTOCOL_ERROR, "padding longer than the frame")
    return payload[1 : len(payload) - padding]
