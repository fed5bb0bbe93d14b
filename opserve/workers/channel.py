"""Length-prefixed pickled messages over a stream socket: the worker's blocking side."""

from __future__ import annotations

import pickle
import socket
import struct

from opserve.workers.messages import Message

FRAME = struct.Struct("<I")


def encode(message: Message) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return FRAME.pack(len(payload)) + payload


class BlockingChannel:
    """One end of a socket pair, read and written with blocking calls (the worker's side)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._reader = sock.makefile("rb", buffering=1 << 16)

    def receive(self) -> Message | None:
        """The next message, or None when the other side has gone."""
        header = self._reader.read(FRAME.size)
        if len(header) < FRAME.size:
            return None
        (length,) = FRAME.unpack(header)
        payload = self._reader.read(length)
        if len(payload) < length:
            return None
        return pickle.loads(payload)

    def send(self, message: Message) -> None:
        self._sock.sendall(encode(message))
