"""HTTP/1.1 on the wire (opserve's own protocol): keep-alive, pipelining, chunked bodies,
HTTP/1.0, Expect: 100-continue, HEAD and malformed requests, a graceful stop, through raw
sockets."""

from __future__ import annotations

import json
import signal
import socket
from pathlib import Path

from tests.serving import RunningServer
from tests.test_python_models import place_python_model
from tests.test_scheduling_policies import wait_for_log

SIMPLE = json.dumps(
    {
        "inputs": [
            {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": list(range(16))},
            {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16},
        ]
    }
).encode()
INFER = b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: t\r\n"


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body


class Wire:
    """One client connection, read response by response."""

    def __init__(self, server: RunningServer) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buffer += data
        return bool(data)

    def read(self, head_only: bool = False) -> Response:
        while b"\r\n\r\n" not in self.buffer:
            assert self._fill(), f"connection closed mid-response: {self.buffer!r}"
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
        length = 0 if head_only else int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            assert self._fill(), "connection closed mid-body"
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return Response(int(status_line.split()[1]), headers, body)

    def closed(self) -> bool:
        """True once the server has closed the connection (nothing more to read)."""
        return not self.buffer and not self._fill()

    def close(self) -> None:
        self.sock.close()


def infer_request(body: bytes = SIMPLE, extra: bytes = b"") -> bytes:
    return INFER + b"Content-Length: %d\r\n" % len(body) + extra + b"\r\n" + body


def output0(response: Response) -> list[int]:
    assert response.status == 200, response.body
    outputs = {o["name"]: o for o in json.loads(response.body)["outputs"]}
    return list(outputs["OUTPUT0"]["data"])


def test_pipelined_requests_are_answered_in_order_on_one_connection(
    server: RunningServer,
) -> None:
    wire = Wire(server)
    other = SIMPLE.replace(b"[1, 1, 1, 1", b"[5, 1, 1, 1")
    wire.send(
        infer_request()
        + b"GET /v2/health/live HTTP/1.1\r\n\r\n"
        + infer_request(other)
        + b"GET /v2/nowhere HTTP/1.1\r\n\r\n"
    )
    assert output0(wire.read()) == [i + 1 for i in range(16)]
    live = wire.read()
    assert (live.status, live.body) == (200, b"")
    assert output0(wire.read())[0] == 5
    missing = wire.read()
    assert missing.status == 404
    assert json.loads(missing.body) == {"error": "unknown path '/v2/nowhere'"}
    wire.send(infer_request())  # the connection is still open for more
    assert output0(wire.read())[1] == 2
    wire.close()


def test_chunked_request_body(server: RunningServer) -> None:
    wire = Wire(server)
    pieces = [SIMPLE[:7], SIMPLE[7:50], SIMPLE[50:]]
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    wire.send(INFER + b"Transfer-Encoding: chunked\r\n\r\n" + body)
    assert output0(wire.read()) == [i + 1 for i in range(16)]
    wire.close()


def test_http_1_0_and_connection_close_end_the_connection(server: RunningServer) -> None:
    for request in (
        b"GET /v2/health/live HTTP/1.0\r\n\r\n",
        b"GET /v2/health/live HTTP/1.1\r\nConnection: close\r\n\r\n",
    ):
        wire = Wire(server)
        wire.send(request)
        response = wire.read()
        assert response.status == 200
        assert response.headers["connection"] == "close"
        assert wire.closed()
        wire.close()


def test_expect_100_continue(server: RunningServer) -> None:
    wire = Wire(server)
    wire.send(INFER + b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(SIMPLE))
    assert wire.read(head_only=True).status == 100
    wire.send(SIMPLE)
    assert output0(wire.read())[0] == 1
    wire.close()


def test_head_gets_headers_without_a_body(server: RunningServer) -> None:
    wire = Wire(server)
    wire.send(b"HEAD /v2 HTTP/1.1\r\n\r\nGET /v2/health/live HTTP/1.1\r\n\r\n")
    head = wire.read(head_only=True)
    assert head.status == 400  # GET only, as Triton
    assert int(head.headers["content-length"]) > 0
    assert wire.read().status == 200  # the next response follows at once: no body in between
    wire.close()


def test_a_malformed_request_gets_400_and_the_connection_closes(server: RunningServer) -> None:
    wire = Wire(server)
    wire.send(b"NOT HTTP AT ALL\r\n\r\n")
    response = wire.read()
    assert response.status == 400
    assert wire.closed()
    wire.close()


def test_requests_before_a_malformed_one_are_answered_first(server: RunningServer) -> None:
    """Pipelined in one read: the requests before the bad one get their answers, in order,
    then the 400, then the connection closes (it used to close with nothing written)."""
    wire = Wire(server)
    wire.send(infer_request() + b"GET /v2/health/live HTTP/1.1\r\n\r\n" + b"GARBAGE\r\n\r\n")
    assert output0(wire.read()) == [i + 1 for i in range(16)]
    assert wire.read().status == 200
    assert wire.read().status == 400
    assert wire.closed()
    wire.close()
    # a body over the limit (64 MiB by default) behind a good request: Triton's words, after it
    wire = Wire(server)
    wire.send(infer_request() + INFER + b"Content-Length: %d\r\n\r\n" % (1 << 30))
    assert output0(wire.read())[0] == 1
    refused = wire.read()
    assert refused.status == 400
    assert "exceeds the maximum allowed value" in json.loads(refused.body)["error"]
    wire.close()


def test_a_stopping_server_finishes_the_response_in_progress_then_closes(tmp_path: Path) -> None:
    """SIGTERM while a request runs: it is answered (with `connection: close`), the connection
    closes, and the server exits without waiting out its graceful-shutdown timeout."""
    repo = tmp_path / "repository"
    place_python_model(repo, "ordered")
    server = RunningServer([repo], ["--exit-timeout-secs", "5"], log_path=tmp_path / "server.log")
    with server:
        wire = Wire(server)
        body = b'{"inputs":[{"name":"SLEEP","datatype":"FP32","shape":[1,1],"data":[1.0]}]}'
        wire.send(
            b"POST /v2/models/ordered/infer HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body
        )
        wait_for_log(server, "ordered executes 0")
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        response = wire.read()
        assert response.status == 200
        assert response.headers["connection"] == "close"
        assert wire.closed()
        wire.close()
        assert server.process.wait(timeout=60) == 0
        assert "graceful shutdown exceeded" not in server.log()
