"""Length-prefixed pickled messages over a stream socket: the one framing both sides use.

The server reads with `FrameDecoder` from its event loop; the worker reads with the same decoder
from a thread of its own (`BlockingChannel`), and writes from any thread under one lock.
"""

from __future__ import annotations

import pickle
import socket
import struct
import threading
from collections import deque
from collections.abc import Iterator

from opserve.workers.messages import Message

FRAME = struct.Struct("<I")


def encode(message: Message) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return FRAME.pack(len(payload)) + payload


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
                message = pickle.loads(buffer[offset + FRAME.size : end])
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
        self.lock = threading.Lock()  # held while a message (and its ring writes) is sent

    def receive(self) -> Message | None:
        """The next message, or None when the other side has gone."""
        while not self._ready:
            data = self._sock.recv(1 << 16)
            if not data:
                return None
            self._ready.extend(self._decoder.feed(data))
        return self._ready.popleft()

    def send(self, message: Message) -> None:
        with self.lock:
            self._sock.sendall(encode(message))

    def send_locked(self, message: Message) -> None:
        """`send` for a caller that already holds `lock`."""
        self._sock.sendall(encode(message))
