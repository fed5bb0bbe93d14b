"""Length-prefixed pickled messages over a stream socket: the one framing both sides use.

The server reads with `FrameDecoder` from its event loop; the worker reads with the same decoder
from a thread of its own (`BlockingChannel`), and writes from any thread under one lock.
"""

from __future__ import annotations

import os
import pickle
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from opserve.errors import InvalidArgumentError
from opserve.workers.messages import (
    Execute,
    Message,
    Responses,
    TensorRef,
    WireError,
    WireRequest,
    WireResponse,
)

FRAME = struct.Struct("<I")
MAX_MESSAGE_BYTES = (1 << 32) - 1  # what the frame's length can say


# The two messages of every execution travel as plain tuples: pickling dataclasses costs a
# lookup of each class per message, several times the cost of the data (measured: ~15 µs against
# ~3 µs for an execution of one tensor). Every other message is pickled as it is.
_EXECUTE = 1
_RESPONSES = 2


def encode(message: Message) -> bytes:
    kind = type(message)
    body: object
    if kind is Execute:
        assert isinstance(message, Execute)
        body = (
            _EXECUTE,
            message.id,
            [_request_fields(r) for r in message.requests],
            message.ring_end,
            message.slot,
            message.poll_us,
        )
    elif kind is Responses:
        assert isinstance(message, Responses)
        body = (
            _RESPONSES,
            message.id,
            [_response_fields(r) for r in message.responses],
            message.ring_end,
            message.timings,
        )
    else:
        body = message
    payload = pickle.dumps(body, protocol=pickle.HIGHEST_PROTOCOL)
    if len(payload) > MAX_MESSAGE_BYTES:
        raise InvalidArgumentError(
            f"a message between the server and a worker would hold {len(payload)} bytes, more "
            f"than the {MAX_MESSAGE_BYTES} one can carry (the tensors that do not fit the "
            "shared-memory ring travel in it)"
        )
    return FRAME.pack(len(payload)) + payload


def decode(payload: bytes | bytearray | memoryview) -> Message:
    body = pickle.loads(payload)
    if type(body) is not tuple:
        return body
    if body[0] == _EXECUTE:
        return Execute(body[1], [_request(r) for r in body[2]], body[3], body[4], body[5])
    return Responses(body[1], [_response(r) for r in body[2]], body[3], body[4])


def _ref_fields(ref: TensorRef) -> tuple[Any, ...]:
    return (ref.name, ref.datatype, ref.shape, ref.offset, ref.nbytes, ref.inline)


def _request_fields(request: WireRequest) -> tuple[Any, ...]:
    return (
        request.id,
        [_ref_fields(r) for r in request.inputs],
        request.outputs,
        request.parameters,
        request.correlation_id,
        request.flags,
        request.model_name,
        request.model_version,
        request.timeout_us,
    )


def _request(fields: tuple[Any, ...]) -> WireRequest:
    return WireRequest(fields[0], [TensorRef(*r) for r in fields[1]], *fields[2:])


def _response_fields(response: WireResponse) -> tuple[Any, ...]:
    outputs = None if response.outputs is None else [_ref_fields(r) for r in response.outputs]
    error = None if response.error is None else (response.error.code, response.error.message)
    return (response.index, outputs, error, response.final, response.parameters)


def _response(fields: tuple[Any, ...]) -> WireResponse:
    index, outputs, error, final, parameters = fields
    return WireResponse(
        index,
        None if outputs is None else [TensorRef(*r) for r in outputs],
        None if error is None else WireError(*error),
        final,
        parameters,
    )


class FrameDecoder:
    """Feed it bytes as they arrive; it yields each whole message."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[Message]:
        buffer = self._buffer
        buffer += data
        offset = 0
        size = len(buffer)
        try:
            while size - offset >= FRAME.size:
                (length,) = FRAME.unpack_from(buffer, offset)
                end = offset + FRAME.size + length
                if end > size:
                    break
                message = decode(buffer[offset + FRAME.size : end])
                offset = end
                yield message
        finally:
            if offset:
                del buffer[:offset]


class BlockingChannel:
    """One end of a socket pair for blocking code (the worker's side): `receive` from one
    thread, `send` from any."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._decoder = FrameDecoder()
        self._ready: deque[Message] = deque()
        self._wait_ns = 0  # how long `receive` has waited for data of late
        self.lock = threading.Lock()  # held while a message (and its ring writes) is sent
        # The thread sleeps in poll(), not in recv(): a socket pair has one wait queue per end,
        # and every message of ours that the server reads wakes the sleepers on our end "to
        # write". A recv() sleeper wakes for that, finds nothing and sleeps again (about once per
        # execution under load, a context switch that preempts the server); poll() wakes only
        # for what it asked: data to read.
        self._readable = select.poll()
        self._readable.register(sock.fileno(), select.POLLIN)

    def receive(self, poll_us: int = 0) -> Message | None:
        """The next message, or None when the other side has gone. With `poll_us`, the socket
        is polled that long, yielding the core on every round, before the thread sleeps on it
        (see `opserve.polling`), unless the recent waits were longer: polling would then only
        burn the core before sleeping all the same."""
        while not self._ready:
            started = time.monotonic_ns()
            data = None
            if poll_us and self._wait_ns < poll_us * 1000:
                data = self._poll(poll_us)
            if data is None:
                self._readable.poll()
                data = self._sock.recv(1 << 16)
            # the recent waits: an average that follows the last few
            self._wait_ns += (time.monotonic_ns() - started - self._wait_ns) >> 2
            if not data:
                return None
            self._ready.extend(self._decoder.feed(data))
        return self._ready.popleft()

    def _poll(self, poll_us: int) -> bytes | None:
        """What arrives within `poll_us`, or None."""
        recv = self._sock.recv
        deadline = time.monotonic_ns() + poll_us * 1000
        while True:
            try:
                return recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if time.monotonic_ns() >= deadline:
                    return None
                os.sched_yield()

    def receive_ready(self) -> Message | None:
        """The next message if it has arrived whole, without waiting; else None. An
        `OSError` when the other side has gone."""
        while not self._ready:
            try:
                data = self._sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return None
            if not data:
                raise ConnectionResetError("the server has gone")
            self._ready.extend(self._decoder.feed(data))
        return self._ready.popleft()

    def send(self, message: Message) -> None:
        with self.lock:
            self._sock.sendall(encode(message))

    def send_locked(self, message: Message) -> None:
        """`send` for a caller that already holds `lock`."""
        self._sock.sendall(encode(message))
