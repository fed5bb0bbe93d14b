"""What a client may cost the server is bounded (issue 9): body sizes, inflated bodies, slow or
silent connections, the number of connections, worker processes; and heavy decoding does not
stall the event loop. One server with small bounds serves the module."""

from __future__ import annotations

import asyncio
import fcntl
import gzip
import json
import queue
import re
import socket
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient

from opserve.cli import build_parser
from opserve.errors import ErrorCode, InternalError, InvalidArgumentError, NotFoundError
from opserve.frontends.grpc.servicer import as_opserve_error
from opserve.repository import ModelManager
from opserve.repository.locks import NamedLocks
from opserve.settings import ServerSettings
from opserve.triton_flags import triton_values
from tests import models
from tests.conftest import SIMPLE_CONFIG
from tests.serving import RunningServer

LIMIT = 32 << 20  # --http-max-input-size
CONNECTIONS = 8  # --http-max-connections
BYTES_CONFIG = (
    'max_batch_size: 0\ninput [ { name: "INPUT0" data_type: TYPE_STRING dims: [ -1 ] } ]\n'
    'output [ { name: "OUTPUT0" data_type: TYPE_STRING dims: [ -1 ] } ]\n'
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("bounds")
    models.write_model(repo, "simple", models.add_sub(), SIMPLE_CONFIG)
    models.write_model(repo, "strings", models.identity("BYTES", [None]), BYTES_CONFIG)
    flags = [
        "--model-control-mode=explicit",
        "--load-model=*",
        f"--http-max-input-size={LIMIT}",
        "--grpc-max-input-size=1000000",
        "--http-header-timeout-secs=1",
        "--http-body-timeout-secs=1",
        "--http-first-request-timeout-secs=1",
        f"--http-max-connections={CONNECTIONS}",
        "--max-instances-per-model=4",
        "--max-instances-total=4",
        "--http-thread-count=1",  # inflating and counting below run on this one thread
    ]
    log = tmp_path_factory.mktemp("logs") / "bounds.log"
    with RunningServer([repo], flags, log_path=log) as running:
        yield running


def connect(server: RunningServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.settimeout(30)  # a bound for a broken test, not a measure
    return sock


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """One response (status, body) read until the connection closes or its body is complete."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return 0, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(head.split(b" ")[1]), body


def request_head(path: str, length: int, *extra: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: test", f"Content-Length: {length}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def simple_body(padding: int = 0) -> bytes:
    body = {
        "inputs": [
            {"name": n, "datatype": "INT32", "shape": [1, 16], "data": list(range(16))}
            for n in ("INPUT0", "INPUT1")
        ]
    }
    text = json.dumps(body)
    return (text[:-1] + " " * padding + text[-1]).encode()


# sizes -------------------------------------------------------------------------------------


def test_a_body_over_the_limit_is_refused_before_it_is_sent(server: RunningServer) -> None:
    # the body never comes: the answer must not wait for it; nor may it send 100 Continue
    for extra in ((), ("Expect: 100-continue",)):
        with connect(server) as sock:
            sock.sendall(request_head("/v2/models/simple/infer", LIMIT + 1, *extra))
            status, body = read_response(sock)
        assert status == 400
        assert json.loads(body)["error"] == (
            f"Request body size of {LIMIT + 1} bytes exceeds the maximum allowed value of "
            f"{LIMIT} bytes. Use --http-max-input-size to increase the limit."
        )


def test_a_chunked_body_is_counted_as_it_arrives(server: RunningServer) -> None:
    chunk = b"x" * (1 << 20)
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        while sent <= LIMIT:  # no more than it takes to pass the limit
            sent += len(chunk)
            yield chunk

    response = requests.post(f"http://{server.url}/v2/models/simple/infer", data=chunks())
    assert response.status_code == 400
    assert "exceeds the maximum allowed value of" in response.json()["error"]


def test_a_body_at_the_limit_is_read(server: RunningServer) -> None:
    body = simple_body(LIMIT - len(simple_body()))
    assert len(body) == LIMIT
    response = requests.post(f"http://{server.url}/v2/models/simple/infer", data=body)
    assert response.status_code == 200, response.text


def test_a_compression_bomb_is_refused_at_the_limit(server: RunningServer) -> None:
    url = f"http://{server.url}/v2/models/simple/infer"
    bomb = gzip.compress(simple_body(LIMIT))  # inflates to more than the limit
    assert len(bomb) < LIMIT // 100
    response = requests.post(url, data=bomb, headers={"Content-Encoding": "gzip"})
    assert response.status_code == 400
    assert response.json()["error"] == (
        f"Decompressed data size exceeds the maximum allowed value of {LIMIT} bytes. Use "
        "--http-max-input-size to increase the limit."
    )
    # under the limit, compressed or not ("identity" means no encoding)
    for encoding, body in (("gzip", gzip.compress(simple_body(1000))), ("identity", simple_body())):
        response = requests.post(url, data=body, headers={"Content-Encoding": encoding})
        assert response.status_code == 200, response.text
        assert response.json()["outputs"][0]["data"] == [2 * i for i in range(16)]


def test_a_grpc_message_over_its_limit_is_refused(server: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    strings = np.array([b"x" * 1000] * 1000, dtype=np.object_)  # 1,004,000 bytes
    tensor = grpcclient.InferInput("INPUT0", [len(strings)], "BYTES")
    tensor.set_data_from_numpy(strings)
    with pytest.raises(Exception, match="larger than max"):
        client.infer("strings", [tensor])
    tensor = grpcclient.InferInput("INPUT0", [10], "BYTES")
    tensor.set_data_from_numpy(strings[:10])
    assert client.infer("strings", [tensor]).as_numpy("OUTPUT0").tolist() == strings[:10].tolist()


# time ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sent, why",
    [
        (b"GET /v2/health/live HTTP/1.1\r\nHost: test\r\n", "headers"),
        (request_head("/v2/models/simple/infer", 100) + b"{", "body"),
    ],
    ids=["headers never end", "body stalls"],
)
def test_a_request_that_never_arrives_is_answered_408(
    server: RunningServer, sent: bytes, why: str
) -> None:
    with connect(server) as sock:
        sock.sendall(sent)
        status, body = read_response(sock)
        assert status == 408
        assert json.loads(body)["error"] == f"the request's {why} did not arrive in time"
        assert sock.recv(100) == b""  # and the connection is closed


def test_a_connection_that_sends_nothing_is_closed(server: RunningServer) -> None:
    with connect(server) as sock:
        assert sock.recv(100) == b""


# connections ---------------------------------------------------------------------------------


def test_past_the_connection_limit_new_connections_are_refused_and_others_carry_on(
    server: RunningServer,
) -> None:
    health = b"GET /v2/health/live HTTP/1.1\r\nHost: test\r\n\r\n"
    first = connect(server)
    first.sendall(health)
    assert read_response(first)[0] == 200  # served: kept alive past the first-request timeout
    more = [connect(server) for _ in range(CONNECTIONS)]
    try:
        # each new one is either refused at once, or closed when it never sends a request
        answers = [read_response(sock)[0] for sock in more]
        assert 503 in answers and set(answers) <= {0, 503}
        assert answers.count(0) <= CONNECTIONS - 1
        first.sendall(health)  # the connection that was open keeps working
        assert read_response(first)[0] == 200
    finally:
        first.close()
        for sock in more:
            sock.close()
    for _ in range(100):  # once they are gone, a new connection is served again
        with connect(server) as sock:
            sock.sendall(health)
            if read_response(sock)[0] == 200:
                break
    else:
        pytest.fail("no new connection was served after the others closed")


def test_grpc_connections_are_bounded_too(server: RunningServer) -> None:
    """The same flags bound gRPC: a connection that never sends its preface is closed, one past
    the limit is refused with GOAWAY, and gRPC serves again once they are gone."""
    with socket.create_connection(("127.0.0.1", server.grpc_port)) as silent:
        silent.settimeout(30)
        received = b""
        while chunk := silent.recv(4096):  # our SETTINGS, then GOAWAY and the close
            received += chunk
        assert received[3] == 4 and b"no connection preface in time" in received
    crowd = [
        socket.create_connection(("127.0.0.1", server.grpc_port)) for _ in range(CONNECTIONS + 1)
    ]
    try:
        for sock in crowd:
            sock.settimeout(30)
        refused = crowd[-1].recv(4096)
        assert refused[3] == 7 and b"too many connections" in refused  # a GOAWAY frame
    finally:
        for sock in crowd:
            sock.close()
    for _ in range(100):
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            if client.is_server_live():
                break
        except Exception:
            time.sleep(0.1)
        finally:
            client.close()
    else:
        pytest.fail("gRPC did not serve again after the crowd left")


# the event loop --------------------------------------------------------------------------------


def test_a_health_probe_is_answered_while_a_large_bytes_request_is_decoded(
    server: RunningServer,
) -> None:
    count = 3_000_000
    elements = np.frombuffer(b"\x01\x00\x00\x00x" * count, dtype=np.uint8).tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT0",
                    "datatype": "BYTES",
                    "shape": [count + 1],  # refused once its elements are counted
                    "parameters": {"binary_data_size": len(elements)},
                }
            ]
        }
    ).encode()
    with connect(server) as big, connect(server) as probe:
        big.sendall(
            request_head(
                "/v2/models/strings/infer",
                len(header) + len(elements),
                f"Inference-Header-Content-Length: {len(header)}",
            )
            + header
            + elements
        )
        while _unacknowledged(big):  # until the server has the whole request
            time.sleep(0.001)
        probe.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: test\r\n\r\n")
        assert read_response(probe)[0] == 200
        big.setblocking(False)
        with pytest.raises(BlockingIOError):  # the large request is still being worked on
            big.recv(1)
        big.setblocking(True)
        status, body = read_response(big)
    assert status == 400
    assert f"holds {count} BYTES elements, but its shape [{count + 1}]" in body.decode()


def _unacknowledged(sock: socket.socket) -> int:
    """Bytes sent but not yet acknowledged by the peer (Linux: TIOCOUTQ)."""
    return int.from_bytes(fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0\0\0\0"), "little")


# worker processes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "count, message",
    [
        (
            5,
            "model 'simple' asks for 5 instances (5 per version, 1 version(s)), more than "
            "--max-instances-per-model 4 allows",
        ),
        (
            4,
            # 'strings' holds two: Triton's default count for an ONNX model on CPU
            "model 'simple' asks for 4 instances, but 2 of the --max-instances-total 4 are in "
            "use by other models",
        ),
    ],
    ids=["per model", "in total"],
)
def test_a_load_asking_for_too_many_instances_is_refused(
    server: RunningServer, count: int, message: str
) -> None:
    config = {"max_batch_size": 8, "instance_group": [{"count": count, "kind": "KIND_CPU"}]}
    response = requests.post(
        f"http://{server.url}/v2/repository/models/simple/load",
        json={"parameters": {"config": json.dumps(config)}},
    )
    assert response.status_code == 400
    assert message in response.json()["error"]
    # the model that was loaded keeps serving
    assert requests.post(f"http://{server.url}/v2/models/simple/infer", data=simple_body()).ok


# no lost answers ------------------------------------------------------------------------------


def test_every_request_on_a_stream_gets_one_answer(server: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    answers: queue.Queue[tuple[object, object]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    strings = np.array([b"a", b"\xff"], dtype=np.object_)
    try:
        for index in range(30):
            tensor = grpcclient.InferInput("INPUT0", [1], "BYTES")
            tensor.set_data_from_numpy(strings[index % 3 == 1 :][:1])
            version = "\u00b2" if index % 3 == 0 else ""
            client.async_stream_infer(
                "strings", [tensor], model_version=version, request_id=str(index)
            )
        got = [answers.get(timeout=60) for _ in range(30)]
    finally:
        client.stop_stream()
    errors = sorted(str(error) for _, error in got if error is not None)
    assert len(errors) == 20
    assert sum("specified version string '\u00b2'" in e for e in errors) == 10
    assert sum("BYTES element 0 is not valid UTF-8" in e for e in errors) == 10
    assert answers.empty()


def test_names_that_are_no_model_leave_nothing_behind(tmp_path: Path) -> None:
    manager = ModelManager([tmp_path])

    async def load_and_unload(name: str) -> None:
        with pytest.raises(InternalError, match="failed to poll from model repository"):
            await manager.load(name)  # Triton's code and words for a model it cannot find
        with pytest.raises(NotFoundError):
            await manager.unload(name)

    async def main() -> None:
        await asyncio.gather(*(load_and_unload(f"no-such-model-{i}") for i in range(1000)))

    asyncio.run(main())
    assert len(manager._locks) == 0


def test_one_name_is_held_by_one_holder_at_a_time() -> None:
    locks = NamedLocks()
    inside: list[str] = []

    async def hold(name: str, tag: str) -> None:
        async with locks.hold(name):
            inside.append(f"{tag} in")
            await asyncio.sleep(0)
            inside.append(f"{tag} out")

    async def main() -> None:
        await asyncio.gather(hold("m", "a"), hold("m", "b"), hold("n", "c"))

    asyncio.run(main())
    assert inside.index("a out") < inside.index("b in")
    assert inside.index("c in") < inside.index("a out")  # another name does not wait
    assert len(locks) == 0


def bound_settings(*flags: str) -> ServerSettings:
    args, unknown = build_parser().parse_known_args(["serve", "--model-repository", "r", *flags])
    assert unknown == []
    return ServerSettings.from_flags(args, triton_values(args)[0])


def test_the_bounds_flags_and_their_defaults() -> None:
    default = bound_settings()
    assert default.http_limits.max_input_size == 64 << 20  # Triton's default
    assert default.grpc_max_input_size == (1 << 31) - 1  # Triton's gRPC message size
    assert default.http_limits.max_connections >= 16
    settings = bound_settings(
        "--http-max-input-size=1024",
        "--grpc-max-input-size=2048",
        "--http-header-timeout-secs=2",
        "--http-body-timeout-secs=3",
        "--http-first-request-timeout-secs=4",
        "--http-max-connections=5",
        "--max-instances-per-model=6",
        "--max-instances-total=7",
    )
    limits = settings.http_limits
    assert (limits.max_input_size, settings.grpc_max_input_size) == (1024, 2048)
    assert (limits.header_timeout_s, limits.body_timeout_s) == (2, 3)
    assert (limits.first_request_timeout_s, limits.max_connections) == (4, 5)
    assert (settings.max_instances_per_model, settings.max_instances_total) == (6, 7)


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--http-max-input-size=0", "--http-max-input-size must be greater than 0"),
        ("--grpc-max-input-size=0", "--grpc-max-input-size must be between 1 and"),
        ("--http-body-timeout-secs=0", "--http-body-timeout-secs must be positive"),
        ("--http-max-connections=-1", "--http-max-connections must not be negative"),
        ("--max-instances-total=0", "--max-instances-total must be at least 1"),
    ],
)
def test_bounds_that_bound_nothing_are_refused(flag: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        bound_settings(flag)


def test_a_bug_in_a_grpc_call_is_internal_with_its_message() -> None:
    error = as_opserve_error(KeyError("x"), "ModelInfer")
    assert error.code is ErrorCode.INTERNAL
    assert error.message == "internal error: KeyError: 'x'"
    refused = InvalidArgumentError("bad")
    assert as_opserve_error(refused, "ModelInfer") is refused
