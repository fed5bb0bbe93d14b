"""A request whose head repeats the last one's byte for byte is taken without the parser, and
must reach the application exactly as a parsed one does. The connection is fed bytes through an
in-memory transport; the application records each exchange and answers at once."""

from __future__ import annotations

import asyncio
from typing import Any

from opserve.frontends.http.protocol import Exchange, HttpConnection
from tests.protocols import HttpConfig, ServerState, Transport

HEAD = (
    b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
    b"Inference-Header-Content-Length: 2\r\n\r\n"
)


def serve(reads: list[bytes]) -> tuple[list[dict[str, Any]], bytes, HttpConnection]:
    """Feed `reads` one by one; what each exchange looked like, what was written, the
    connection."""
    seen: list[dict[str, Any]] = []

    async def run() -> tuple[bytes, HttpConnection]:
        def answer_now(exchange: Exchange) -> bool:
            scope = exchange.scope
            seen.append(
                {
                    "method": scope["method"],
                    "path": scope["path"],
                    "headers": list(scope["headers"]),
                    "version": scope["http_version"],
                    "body": exchange.body,
                    "keep_alive": exchange.keep_alive,
                }
            )
            exchange.respond(200, [], exchange.body)
            return True

        loop = asyncio.get_running_loop()
        connection = HttpConnection(HttpConfig(answer_now), ServerState(), _loop=loop)  # type: ignore[arg-type]
        transport = Transport()
        connection.connection_made(transport)
        for data in reads:
            connection.data_received(data)
            await asyncio.sleep(0)
        connection.connection_lost(None)
        return bytes(transport.written), connection

    written, connection = asyncio.run(run())
    return seen, written, connection


def test_a_repeated_head_gives_what_parsing_gives() -> None:
    seen, written, connection = serve([HEAD + b"{}ab", HEAD + b"{}cd", HEAD + b"{}ef"])
    assert connection.known_head is not None and connection.known_head.head == HEAD
    assert [s["body"] for s in seen] == [b"{}ab", b"{}cd", b"{}ef"]
    first = dict(seen[0], body=None)
    assert all(dict(s, body=None) == first for s in seen[1:])
    assert first["path"] == "/v2/models/m/infer" and first["keep_alive"]
    assert (b"content-length", b"4") in first["headers"]
    assert written.count(b"HTTP/1.1 200") == 3 and written.endswith(b"ef")


def test_another_head_or_another_split_is_parsed() -> None:
    other = HEAD.replace(b"/m/", b"/n/")
    seen, _, connection = serve([HEAD + b"{}ab", HEAD, b"{}cd", other + b"{}ef"])
    assert [s["body"] for s in seen] == [b"{}ab", b"{}cd", b"{}ef"]
    assert [s["path"] for s in seen][-1] == "/v2/models/n/infer"
    assert connection.known_head is not None and connection.known_head.head == other


def test_pipelined_requests_in_one_read_are_parsed_in_order() -> None:
    seen, written, connection = serve([HEAD + b"{}ab", HEAD + b"{}cd" + HEAD + b"{}ef"])
    assert [s["body"] for s in seen] == [b"{}ab", b"{}cd", b"{}ef"]
    assert written.count(b"HTTP/1.1 200") == 3
    # a read holding the known head, a body and the start of the next request
    seen, _, _ = serve([HEAD + b"{}ab", HEAD + b"{}cd" + HEAD[:10], HEAD[10:] + b"{}ef"])
    assert [s["body"] for s in seen] == [b"{}ab", b"{}cd", b"{}ef"]


def test_heads_that_frame_otherwise_are_not_remembered() -> None:
    chunked = (
        b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4\r\n{}ab\r\n0\r\n\r\n"
    )
    closing = HEAD.replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n") + b"{}ab"
    expecting = HEAD.replace(b"Host: x\r\n", b"Host: x\r\nExpect: 100-continue\r\n") + b"{}ab"
    for request in (chunked, closing, expecting):
        seen, _, connection = serve([request])
        assert seen[0]["body"] == b"{}ab"
        assert connection.known_head is None


def test_a_stray_line_break_after_the_body_is_not_taken_for_the_head() -> None:
    # llhttp skips a CRLF between requests; the head must still end where the body begins
    head = HEAD.replace(b"Content-Length: 4", b"Content-Length: 6")
    seen, _, connection = serve([head + b"\r\n{}ab\r\n", head + b"\r\n{}cd\r\n"])
    assert [s["body"] for s in seen] == [b"\r\n{}ab", b"\r\n{}cd"]
    assert connection.known_head is None


def test_a_read_that_completes_a_partial_request_is_parsed() -> None:
    # the read looks like the known head and a body, but it continues a header begun before
    partial = b"POST /v2/models/m/infer HTTP/1.1\r\nX-Pad: "
    seen, _, _ = serve([HEAD + b"{}ab", partial, HEAD + b"{}cd"])
    assert seen[1]["body"] == b"{}cd"
    assert (b"x-pad", b"POST /v2/models/m/infer HTTP/1.1") in seen[1]["headers"]
