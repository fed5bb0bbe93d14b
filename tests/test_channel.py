"""The framing both sides of the worker boundary use: every message survives the trip whole."""

from __future__ import annotations

import socket
import threading
import time

from opserve.signature import ModelSignature, TensorSpec
from opserve.workers.channel import BlockingChannel, FrameDecoder, encode
from opserve.workers.messages import (
    BlsRequest,
    Call,
    Execute,
    ModelLoaded,
    Responses,
    TensorRef,
    WireError,
    WireRequest,
    WireResponse,
)

MESSAGES = [
    Execute(
        7,
        [
            WireRequest(
                "id-1",
                [
                    TensorRef("X", "FP32", (2, 4), 64, 32),
                    TensorRef("S", "BYTES", (1,), inline=b"x"),
                ],
                ["Y"],
                {"k": "v", "n": 3},
                correlation_id="seq",
                flags=2,
                timeout_us=50,
            )
        ],
        4096,
        slot=3,
        poll_us=250,
    ),
    Responses(
        7,
        [
            WireResponse(0, [TensorRef("Y", "FP32", (2, 4), 0, 32)], None, True, {"p": 1.5}),
            WireResponse(1, None, WireError("INVALID_ARG", "bad"), False),
            WireResponse(2, None, None, True),
        ],
        128,
        (1, 2, 3, 4),
    ),
    Responses(8, [], 0, None),
    ModelLoaded(3, ModelSignature((TensorSpec("X", "FP32", (-1, 4)),), ()), ["/lib.so"]),
    BlsRequest(2, WireRequest("", [], None, model_name="m", model_version="1"), True, 0, 64),
    Call(0, "log", {"level": "INFO", "message": "hello"}),
]


def test_every_message_survives_the_trip_in_pieces() -> None:
    stream = b"".join(encode(m) for m in MESSAGES)
    decoder = FrameDecoder()
    received = []
    for start in range(0, len(stream), 7):  # arrives in odd-sized pieces
        received.extend(decoder.feed(stream[start : start + 7]))
    assert received == MESSAGES


def test_a_polling_receive_takes_what_arrives_while_it_polls_and_sleeps_after() -> None:
    server, worker = socket.socketpair()
    channel = BlockingChannel(worker)
    try:
        early = threading.Timer(0.002, lambda: server.sendall(encode(Call(0, "log", {"n": 1}))))
        early.start()
        assert channel.receive(poll_us=2_000_000) == Call(0, "log", {"n": 1})
        # nothing within the poll: the thread goes on to sleep on the socket, and still gets it
        late = threading.Timer(0.05, lambda: server.sendall(encode(Call(0, "log", {"n": 2}))))
        started = time.monotonic()
        late.start()
        assert channel.receive(poll_us=1000) == Call(0, "log", {"n": 2})
        assert time.monotonic() - started >= 0.05
        server.close()
        assert channel.receive(poll_us=1000) is None  # the other side has gone
    finally:
        worker.close()


def test_a_receive_sleeps_at_once_when_the_recent_waits_outlast_its_poll() -> None:
    server, worker = socket.socketpair()
    channel = BlockingChannel(worker)
    try:
        for _ in range(4):  # waits of 60 ms, far beyond a poll of 20 ms
            timer = threading.Timer(0.06, lambda: server.sendall(encode(Call(0, "log", {}))))
            timer.start()
            assert channel.receive(poll_us=20_000) == Call(0, "log", {})
        timer = threading.Timer(0.06, lambda: server.sendall(encode(Call(0, "log", {"n": 5}))))
        cpu = time.thread_time()
        timer.start()
        assert channel.receive(poll_us=20_000) == Call(0, "log", {"n": 5})
        # polling would have spent about 20 ms of this thread's time before sleeping
        assert time.thread_time() - cpu < 0.01
    finally:
        server.close()
        worker.close()


def _voluntary_switches(native_id: int) -> int:
    with open(f"/proc/self/task/{native_id}/status") as status:
        for line in status:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches in /proc")


def test_a_sleeping_receive_does_not_wake_while_the_server_reads_what_the_worker_sent() -> None:
    """The worker's reader sleeps while its model's answers go out on the same socket. Each
    answer the server reads signals "room to write" on the worker's end: a reader sleeping in
    recv() woke for every one of them, preempting the server for nothing."""
    server, worker = socket.socketpair()
    channel = BlockingChannel(worker)
    sleeper: list[int] = []
    received: list[object] = []

    def read() -> None:
        sleeper.append(threading.get_native_id())
        received.append(channel.receive())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        while not sleeper:
            time.sleep(0.001)
        time.sleep(0.05)  # the reader is asleep by now
        before = _voluntary_switches(sleeper[0])
        answers = 200
        for n in range(answers):
            channel.send(Call(0, "log", {"n": n}))  # the worker answers...
            server.recv(1 << 16)  # ...and the server reads the answer
        woken = _voluntary_switches(sleeper[0]) - before
        assert woken < answers // 10, f"the sleeping reader woke {woken} times"
        assert reader.is_alive() and not received
    finally:
        server.sendall(encode(Call(0, "log", {"last": True})))
        reader.join(5)
        server.close()
        worker.close()
    assert received == [Call(0, "log", {"last": True})]
