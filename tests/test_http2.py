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


class Peer:
    """Runs the connection on an event loop of its own, one step at a time: what it writes
    during a step leaves when the step's callbacks have run, as on a server."""

    def __init__(self, connection: Http2Connection) -> None:
        self.connection = connection
        self.loop = asyncio.new_event_loop()

    def run(self, action) -> None:
        async def step() -> None:
            action()
            await asyncio.sleep(0)  # the outbox is sent by a callback of the loop
            await asyncio.sleep(0)

        self.loop.run_until_complete(step())

    def feed(self, data: bytes) -> None:
        self.run(lambda: self.connection.data_received(data))


@pytest.fixture
def connected():
    recorder, transport = Recorder(), Transport()
    connection = Http2Connection(recorder, KeepaliveSettings(max_ping_strikes=1))
    peer = Peer(connection)
    peer.run(lambda: connection.connection_made(transport))  # type: ignore[arg-type]
    peer.feed(PREFACE + frame(SETTINGS, 0, 0))
    frames = transport.frames()
    assert [f[0] for f in frames] == [SETTINGS, WINDOW_UPDATE, SETTINGS]  # ours, then the ACK
    assert frames[2][1] == ACK
    yield peer, recorder, transport
    connection.connection_lost(None)
    peer.loop.close()


def test_a_request_split_over_continuation_and_padded_data(connected) -> None:
    peer, recorder, transport = connected
    block = hpack.Encoder().encode(REQUEST)
    padded = bytes([3]) + b"xyz" + b"\0\0\0"
    peer.feed(
        frame(HEADERS, 0, 1, block[:5])
        + frame(CONTINUATION, END_HEADERS, 1, block[5:])
        + frame(DATA, PADDED | END_STREAM, 1, padded)
    )
    assert recorder.events == [
        ("headers", 1, dict(REQUEST)),
        ("data", 1, (b"xyz", True)),
    ]


def test_pings_are_answered_and_a_flood_is_refused(connected) -> None:
    peer, _, transport = connected
    peer.feed(frame(PING, 0, 0, b"12345678"))
    assert transport.frames() == [(PING, ACK, 0, b"12345678")]
    peer.feed(frame(PING, 0, 0, b"12345678") * 2)  # 2 strikes > 1 allowed
    kinds = [f[0] for f in transport.frames()]
    assert kinds[-1] == GOAWAY and transport.closed


def test_pings_while_data_flows_are_not_strikes(connected) -> None:
    """gRPC core forgives a client's pings whenever the server sends data, headers or a
    WINDOW_UPDATE: a client reading a large answer pings as it reads (BDP probes), and
    perf_analyzer's 64 MiB calls were ended with too_many_pings before."""
    peer, recorder, transport = connected  # at most 1 strike
    peer.feed(
        frame(SETTINGS, 0, 0, struct.pack(">HI", http2.INITIAL_WINDOW_SIZE, 10))
        + frame(HEADERS, END_HEADERS | END_STREAM, 1, hpack.Encoder().encode(REQUEST))
    )
    stream = recorder.streams[1]
    peer.run(lambda: stream.send_response(b"\x88", [b"x" * 40], b"\x88"))
    for _ in range(3):  # a ping, then room for 10 more bytes of the answer
        peer.feed(frame(PING, 0, 0, b"12345678"))
        peer.feed(frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", 10)))
    sent = transport.frames()
    assert GOAWAY not in [f[0] for f in sent] and not transport.closed
    assert b"".join(f[3] for f in sent if f[0] == DATA) == b"x" * 40  # all of it
    # the client's upload: our WINDOW_UPDATEs forgive its pings as well
    peer.feed(frame(HEADERS, END_HEADERS, 3, hpack.Encoder().encode(REQUEST)))
    chunk = frame(DATA, 0, 3, b"\0" * http2.DEFAULT_MAX_FRAME)
    for _ in range(3):
        peer.feed(frame(PING, 0, 0, b"12345678"))
        peer.feed(chunk * (http2.RECEIVE_WINDOW // 2 // http2.DEFAULT_MAX_FRAME))
    sent = transport.frames()
    assert WINDOW_UPDATE in [f[0] for f in sent]
    assert GOAWAY not in [f[0] for f in sent] and not transport.closed


def test_a_response_waits_for_the_clients_window(connected) -> None:
    peer, recorder, transport = connected
    peer.feed(
        frame(SETTINGS, 0, 0, struct.pack(">HI", http2.INITIAL_WINDOW_SIZE, 10))
        + frame(HEADERS, END_HEADERS | END_STREAM, 1, hpack.Encoder().encode(REQUEST))
    )
    transport.frames()
    stream = recorder.streams[1]
    peer.run(lambda: stream.send_response(b"\x88", [b"0123456789abcdef"], b"\x88"))
    sent = transport.frames()
    assert [(f[0], f[3]) for f in sent] == [(HEADERS, b"\x88"), (DATA, b"0123456789")]
    peer.feed(frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", 100)))
    sent = transport.frames()
    assert [(f[0], f[1] & END_STREAM, f[3]) for f in sent] == [
        (DATA, 0, b"abcdef"),
        (HEADERS, END_STREAM, b"\x88"),
    ]
    assert 1 not in peer.connection.streams  # both sides closed


def test_a_reset_stream_is_reported_and_forgotten(connected) -> None:
    peer, recorder, transport = connected
    peer.feed(frame(HEADERS, END_HEADERS, 1, hpack.Encoder().encode(REQUEST)))
    peer.feed(frame(RST_STREAM, 0, 1, struct.pack(">I", 8)))
    assert recorder.events[-1] == ("reset", 1, None) and not peer.connection.streams


def test_a_bad_preface_ends_the_connection() -> None:
    transport = Transport()
    peer = Peer(Http2Connection(Recorder(), KeepaliveSettings(time_ms=0)))
    peer.connection.transport = transport  # type: ignore[assignment]
    peer.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    (goaway,) = transport.frames()
    assert goaway[0] == GOAWAY and int.from_bytes(goaway[3][4:8], "big") == http2.PROTOCOL_ERROR
    assert transport.closed
    peer.loop.close()


def test_grpc_timeouts_and_statuses() -> None:
    assert parse_timeout("100m") == pytest.approx(0.1)
    assert parse_timeout("2S") == 2 and parse_timeout("1H") == 3600
    assert parse_timeout("123456789S") is None and parse_timeout("5x") is None
    decoded = hpack.Decoder().decode(status_block(3, "bad: 100% wrong\n"))
    assert decoded == [("grpc-status", "3"), ("grpc-message", "bad: 100%25 wrong%0A")]


def test_indexed_header_blocks_follow_the_dynamic_table(connected) -> None:
    """An indexed-only block is decoded once and remembered, until a block changes the table:
    then the same bytes mean other headers."""
    peer, recorder, _ = connected
    encoder = hpack.Encoder()
    first = encoder.encode([(":path", "/a/B"), ("x-key", "v1")])
    peer.feed(frame(HEADERS, END_HEADERS | END_STREAM, 1, first))
    indexed = encoder.encode([(":path", "/a/B"), ("x-key", "v1")])
    assert min(indexed) >= 0x80  # indexed fields only
    peer.feed(frame(HEADERS, END_HEADERS | END_STREAM, 3, indexed))
    peer.feed(frame(HEADERS, END_HEADERS | END_STREAM, 5, indexed))
    changed = encoder.encode([(":path", "/a/B"), ("x-key", "v2")])  # x-key: v2 now at index 62
    peer.feed(frame(HEADERS, END_HEADERS | END_STREAM, 7, changed))
    peer.feed(frame(HEADERS, END_HEADERS | END_STREAM, 9, indexed))
    values = [headers["x-key"] for kind, _, headers in recorder.events if kind == "headers"]
    assert values == ["v1", "v1", "v1", "v2", "v2"]


def test_an_answer_serialized_in_parts_reads_as_the_whole_message() -> None:
    """The unary ModelInfer answer keeps its raw outputs out of the message: its parts, read by
    protobuf, are the message Triton sends (an output in shared memory keeps an empty entry)."""
    from opserve.frontends.grpc.codec import encode_infer_answer, encode_infer_response
    from opserve.inference import InferenceResponse, Tensor
    from opserve.proto import service_pb2

    big = bytes(range(256)) * 1024  # a length that needs a three-byte varint
    response = InferenceResponse(
        "m",
        "1",
        [
            Tensor("A", "UINT8", (len(big),), big),
            Tensor("S", "FP32", (2,), b"\0" * 8),
            Tensor("E", "FP32", (0,), b""),
        ],
        id="r",
    )
    answer = encode_infer_answer(response, in_shared_memory={"S"})
    parsed = service_pb2.ModelInferResponse.FromString(b"".join(answer.serialized_parts()))
    assert parsed == encode_infer_response(response, in_shared_memory={"S"})
    assert list(parsed.raw_output_contents) == [big, b"", b""]


def test_a_header_without_a_name_resets_its_stream_only(connected) -> None:
    """A malformed request (RFC 9113, 8.2.1) is a stream error: RST_STREAM, and the
    connection's other streams go on (a nameless header used to end the connection)."""
    peer, recorder, transport = connected
    encoder = hpack.Encoder()
    nameless = encoder.encode(REQUEST) + b"\x00\x00\x01x"  # a literal: name "", value "x"
    peer.feed(frame(HEADERS, END_HEADERS, 1, nameless))
    (reset,) = transport.frames()
    assert reset[:3] == (RST_STREAM, 0, 1)
    assert int.from_bytes(reset[3], "big") == http2.PROTOCOL_ERROR
    peer.feed(frame(HEADERS, END_HEADERS | END_STREAM, 3, encoder.encode(REQUEST)))
    assert recorder.events == [("headers", 3, dict(REQUEST))]
    assert not transport.closed
