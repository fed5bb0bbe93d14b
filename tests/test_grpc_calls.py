"""gRPC calls on opserve's HTTP/2, fed bytes without a server: what ends one call (data that
does not inflate, a deadline that passes before the call could run) ends that call with a
status, never the connection and its other calls."""

from __future__ import annotations

import asyncio
import gzip
import struct
from typing import Any

import hpack
import pytest
import uvloop

from opserve.frontends.grpc.calls import GrpcCalls, Method
from opserve.frontends.grpc.http2 import (
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    Http2Connection,
    KeepaliveSettings,
    frame,
)
from opserve.proto import service_pb2
from tests.test_http2 import Transport

PATH = "/inference.GRPCInferenceService/ServerLive"
STREAM_PATH = "/inference.GRPCInferenceService/ModelStreamInfer"


class Server:
    """A connection whose unary method answers `live`, and whose streaming method echoes."""

    def __init__(self) -> None:
        self.handled = 0

        async def live(request: Any, context: Any) -> Any:
            self.handled += 1
            return service_pb2.ServerLiveResponse(live=True)

        async def echo(requests: Any, context: Any) -> Any:
            async for request in requests:
                yield request

        self.calls = GrpcCalls(
            {
                PATH: Method("ServerLive", service_pb2.ServerLiveRequest, live, False),
                STREAM_PATH: Method("ModelStreamInfer", service_pb2.ModelInferRequest, echo, True),
            }
        )
        self.connection = Http2Connection(self.calls, KeepaliveSettings())
        self.transport = Transport()
        self.encoder = hpack.Encoder()

    async def start(self) -> None:
        self.connection.connection_made(self.transport)  # type: ignore[arg-type]
        self.connection.data_received(PREFACE + frame(SETTINGS, 0, 0))
        self.transport.frames()

    def headers(self, stream_id: int, path: str = PATH, extra=(), end: bool = False) -> bytes:
        block = self.encoder.encode(
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", path),
                (":authority", "t"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                *extra,
            ]
        )
        return frame(HEADERS, END_HEADERS | (END_STREAM if end else 0), stream_id, block)

    async def feed(self, data: bytes, turns: int = 3) -> None:
        self.connection.data_received(data)
        for _ in range(turns):
            await asyncio.sleep(0)

    def statuses(self) -> dict[int, str]:
        """grpc-status by stream, from the header blocks written so far."""
        decoder, found = hpack.Decoder(), {}
        for kind, _, stream, payload in self.transport.frames():
            if kind == HEADERS:
                for name, value in decoder.decode(payload):
                    if name == "grpc-status":
                        found[stream] = value
            elif kind == RST_STREAM:
                found[stream] = f"RST {int.from_bytes(payload, 'big')}"
        return found

    def close(self) -> None:
        self.connection.connection_lost(None)


def message(payload: bytes, compressed: bool = False) -> bytes:
    return struct.pack(">BI", int(compressed), len(payload)) + payload


LIVE = b"\x08\x01"  # a ServerLiveRequest with an unknown field: a body that is not empty


@pytest.mark.parametrize(
    "body",
    [b"garbage", gzip.compress(LIVE)[:-8], gzip.compress(LIVE) + b"more"],
    ids=["not gzip", "without its end", "data after its end"],
)
def test_a_message_that_does_not_inflate_ends_its_call_only(body: bytes) -> None:
    async def run() -> dict[int, str]:
        server = Server()
        await server.start()
        gz = [("grpc-encoding", "gzip")]
        await server.feed(
            server.headers(1, extra=gz) + frame(DATA, END_STREAM, 1, message(body, True))
        )
        await server.feed(server.headers(3) + frame(DATA, END_STREAM, 3, message(b"")))
        statuses = server.statuses()
        server.close()
        return statuses

    assert asyncio.run(run()) == {1: "13", 3: "0"}  # INTERNAL; the next call is answered


def test_a_compressed_message_that_inflates_is_answered() -> None:
    async def run() -> dict[int, str]:
        server = Server()
        await server.start()
        gz = [("grpc-encoding", "gzip")]
        body = message(gzip.compress(b""), True)
        await server.feed(server.headers(1, extra=gz) + frame(DATA, END_STREAM, 1, body))
        statuses = server.statuses()
        server.close()
        return statuses

    assert asyncio.run(run()) == {1: "0"}


@pytest.mark.parametrize("timeout", ["0S", "1n", "1u"])
def test_a_deadline_that_passes_at_once_is_answered_deadline_exceeded(timeout: str) -> None:
    async def run() -> tuple[dict[int, str], int]:
        server = Server()
        await server.start()
        deadline = [("grpc-timeout", timeout)]
        await server.feed(
            server.headers(1, extra=deadline) + frame(DATA, END_STREAM, 1, message(b"")), turns=5
        )
        await server.feed(server.headers(3, STREAM_PATH, deadline), turns=5)
        await asyncio.sleep(0.01)
        statuses = server.statuses()
        server.close()
        return statuses, server.handled

    # uvloop, as the server runs: its timers run before the callbacks made ready meanwhile, so
    # the deadline cancels the handlers' tasks before their first step
    loop = uvloop.new_event_loop()
    statuses, _ = loop.run_until_complete(run())
    loop.close()
    assert statuses[3] == "4"  # the stream: DEADLINE_EXCEEDED
    assert statuses[1] in ("0", "4")  # the unary call may win the race, but is answered


def test_a_deadline_that_passes_before_the_message_arrives() -> None:
    async def run() -> tuple[dict[int, str], int]:
        server = Server()
        await server.start()
        await server.feed(server.headers(1, extra=[("grpc-timeout", "1m")]))
        await asyncio.sleep(0.05)
        await server.feed(frame(DATA, END_STREAM, 1, message(b"")))
        statuses = server.statuses()
        server.close()
        return statuses, server.handled

    statuses, handled = asyncio.run(run())
    assert statuses == {1: "4"} and handled == 0  # answered at the deadline, never run
