"""A single-producer, single-consumer byte ring in shared memory (a memfd both processes map).

The writer reserves space and writes tensors; a message tells the reader where they are and the
ring position (`end`) that frees them. The reader consumes messages in order and publishes `end`
in the ring's header once it is done with the data, which lets the writer reuse the space. When
there is no room, `reserve` returns None and the sender ships that tensor inline instead.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from collections import deque

_HEADER = 64
_ALIGN = 64
_RELEASED = struct.Struct("<Q")


class ShmRing:
    def __init__(self, fd: int, capacity: int) -> None:
        self.fd = fd
        self.capacity = capacity
        self._map = mmap.mmap(fd, _HEADER + capacity)
        self.buffer = memoryview(self._map)
        self._head = 0  # writer side: next free position, monotonic

    @classmethod
    def create(cls, capacity: int, name: str = "opserve-ring") -> ShmRing:
        fd = os.memfd_create(name, 0)
        os.ftruncate(fd, _HEADER + capacity)
        return cls(fd, capacity)

    # writer side -----------------------------------------------------------------------------
    @property
    def head(self) -> int:
        return self._head

    def reserve(self, nbytes: int) -> int | None:
        """Space for `nbytes`: its byte offset in `buffer`, or None when the ring is full."""
        size = (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN or _ALIGN
        if size > self.capacity:
            return None
        start = self._head
        position = start % self.capacity
        if position + size > self.capacity:
            start += self.capacity - position  # skip the tail; it is freed with this message
            position = 0
        (released,) = _RELEASED.unpack_from(self.buffer, 0)
        if start + size - released > self.capacity:
            return None
        self._head = start + size
        return _HEADER + position

    def write(self, data: bytes | memoryview) -> int | None:
        """Copy `data` into the ring: its offset, or None when there is no room."""
        offset = self.reserve(len(data))
        if offset is not None:
            self.buffer[offset : offset + len(data)] = data
        return offset

    # reader side -----------------------------------------------------------------------------
    def release(self, end: int) -> None:
        """Everything written before ring position `end` has been consumed."""
        _RELEASED.pack_into(self.buffer, 0, end)

    def close(self) -> None:
        try:
            self.buffer.release()
            self._map.close()
        except BufferError:  # a view is still alive; the mapping goes with the process
            pass
        os.close(self.fd)


class Releases:
    """The reader's side of a ring whose messages finish out of order.

    Each message's `end` is registered in arrival order; `finish(end)` marks one done, and the
    ring is released up to the last message of the longest finished prefix. Thread-safe: the
    worker finishes executions from whichever thread sent their last response.
    """

    def __init__(self, ring: ShmRing) -> None:
        self._ring = ring
        self._open: deque[list[int | bool]] = deque()  # [end, finished]
        self._lock = threading.Lock()

    def register(self, end: int) -> list[int | bool]:
        entry: list[int | bool] = [end, False]
        with self._lock:
            self._open.append(entry)
        return entry

    def finish(self, entry: list[int | bool]) -> None:
        with self._lock:
            entry[1] = True
            released = -1
            while self._open and self._open[0][1]:
                released = int(self._open.popleft()[0])
            if released >= 0:
                self._ring.release(released)
