"""opserve's HTTP/2 (the gRPC transport), frame by frame: preface, settings, pings and their
policing, header blocks split over CONTINUATION, padding, flow control in both directions, resets.
The connection is fed bytes and its writes are read back; no server, no sockets."""

from __future__ import annotations

import asyncio
import struct

import hpack
import pytest

from opserve.frontends.grpc import http2
from opserve.frontends.grpc.calls import parse_timeout, status_block
from opserve.frontends.grpc.http2 import (
    ACK,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PADDED,
    PING,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    Http2Connection,
    KeepaliveSettings,
    Stream,
    frame,
)


class Transport:
    """Collects what the connection writes."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def writelines(self, parts: list[bytes]) -> None:
        for part in parts:
            self.written += part

    def close(self) -> None:
        self.closed = True

    def frames(self) -> list[tuple[int, int, int, bytes]]:
        """(type, flags, stream, payload) of everything written since the last call."""
        out, data = [], bytes(self.written)
        offset = 0
        while offset < len(data):
            length = int.from_bytes(data[offset : offset + 3], "big")
            kind, flags = data[offset + 3], data[offset + 4]
            stream = int.from_bytes(data[offset + 5 : offset + 9], "big") & 0x7FFFFFFF
            out.append((kind, flags, stream, data[offset + 9 : offset + 9 + length]))
            offset += 9 + length
        self.written.clear()
        return out


class Recorder:
    """A StreamHandler that remembers what it was told and answers nothing by itself."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, object]] = []
        self.streams: dict[int, Stream] = {}

    def on_headers(self, stream: Stream, headers, end: bool) -> None:
        self.streams[stream.id] = stream
        self.events.append(("headers", stream.id, dict(headers)))

    def on_data(self, stream: Stream, data: memoryview, end: bool) -> None:
        self.events.append(("data", stream.id, (bytes(data), end)))

    def on_reset(self, stream: Stream) -> None:
        self.events.append(("reset", stream.id, None))


REQUEST = [(":method", "POST"), (":path", "/a/B"), (":scheme", "http"), ("x-key", "v")]


@pytest.fixture
def connected():
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    recorder, transport = Recorder(), Transport()
    connection = Http2Connection(recorder, KeepaliveSettings(max_ping_strikes=1))

    async def make() -> None:
        connection.connection_made(transport)  # type: ignore[arg-type]

    loop.run_until_complete(make())
    connection.data_received(PREFACE + frame(SETTINGS, 0, 0))
    frames = transport.frames()
    assert [f[0] for f in frames] == [SETTINGS, WINDOW_UPDATE, SETTINGS]  # ours, then the ACK
    assert frames[2][1] == ACK
    yield connection, recorder, transport
    connection.connection_lost(None)
    loop.close()
    asyncio.set_event_loop(None)


def test_a_request_split_over_continuation_and_padded_data(connected) -> None:
    connection, recorder, transport = connected
    block = hpack.Encoder().encode(REQUEST)
    padded = bytes([3]) + b"xyz" + b"\0\0\0"
    connection.data_received(
        frame(HEADERS, 0, 1, block[:5])
        + frame(CONTINUATION, END_HEADERS, 1, block[5:])
        + frame(DATA, PADDED | END_STREAM, 1, padded)
    )
    assert recorder.events == [
        ("headers", 1, dict(REQUEST)),
        ("data", 1, (b"xyz", True)),
    ]


def test_pings_are_answered_and_a_flood_is_refused(connected) -> None:
    connection, _, transport = connected
    connection.data_received(frame(PING, 0, 0, b"12345678"))
    assert transport.frames() == [(PING, ACK, 0, b"12345678")]
    connection.data_received(frame(PING, 0, 0, b"12345678") * 2)  # 2 strikes > 1 allowed
    kinds = [f[0] for f in transport.frames()]
    assert kinds[-1] == GOAWAY and transport.closed


def test_a_response_waits_for_the_clients_window(connected) -> None:
    connection, recorder, transport = connected
    connection.data_received(
        frame(SETTINGS, 0, 0, struct.pack(">HI", http2.INITIAL_WINDOW_SIZE, 10))
        + frame(HEADERS, END_HEADERS | END_STREAM, 1, hpack.Encoder().encode(REQUEST))
    )
    transport.frames()
    stream = recorder.streams[1]
    stream.send_response(b"\x88", b"0123456789abcdef", b"\x88")
    sent = transport.frames()
    assert [(f[0], f[3]) for f in sent] == [(HEADERS, b"\x88"), (DATA, b"0123456789")]
    connection.data_received(frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", 100)))
    sent = transport.frames()
    assert [(f[0], f[1] & END_STREAM, f[3]) for f in sent] == [
        (DATA, 0, b"abcdef"),
        (HEADERS, END_STREAM, b"\x88"),
    ]
    assert 1 not in connection.streams  # both sides closed


def test_a_reset_stream_is_reported_and_forgotten(connected) -> None:
    connection, recorder, transport = connected
    connection.data_received(frame(HEADERS, END_HEADERS, 1, hpack.Encoder().encode(REQUEST)))
    connection.data_received(frame(RST_STREAM, 0, 1, struct.pack(">I", 8)))
    assert recorder.events[-1] == ("reset", 1, None) and not connection.streams


def test_a_bad_preface_ends_the_connection() -> None:
    transport = Transport()
    connection = Http2Connection(Recorder(), KeepaliveSettings(time_ms=0))
    connection.transport = transport  # type: ignore[assignment]
    connection.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    (goaway,) = transport.frames()
    assert goaway[0] == GOAWAY and int.from_bytes(goaway[3][4:8], "big") == http2.PROTOCOL_ERROR
    assert transport.closed


def test_grpc_timeouts_and_statuses() -> None:
    assert parse_timeout("100m") == pytest.approx(0.1)
    assert parse_timeout("2S") == 2 and parse_timeout("1H") == 3600
    assert parse_timeout("123456789S") is None and parse_timeout("5x") is None
    decoded = hpack.Decoder().decode(status_block(3, "bad: 100% wrong\n"))
    assert decoded == [("grpc-status", "3"), ("grpc-message", "bad: 100%25 wrong%0A")]
