"""A single-producer, single-consumer byte ring in shared memory (a memfd both processes map).

The writer reserves space and writes tensors; a message tells the reader where they are and the
ring position (`end`) that frees them. The reader consumes messages in order and publishes `end`
in the ring's header once it is done with the data, which lets the writer reuse the space. When
there is no room, `reserve` returns None and the sender ships that tensor inline instead.

The ring grows (as Triton's Python backend grows its shared memory): before writing a whole
batch, the writer `ensure`s room for it, and an empty ring too small for it is enlarged in place
(the memfd is truncated larger and mapped again), up to `max_capacity`. The reader maps the
larger file when a message points past its mapping. Growing only an empty ring keeps every
position valid: no live data sits where the larger ring's positions would put new data.
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
    def __init__(self, fd: int, capacity: int, max_capacity: int | None = None) -> None:
        self.fd = fd
        self.capacity = capacity
        self.max_capacity = max(capacity, max_capacity or capacity)
        self._map = mmap.mmap(fd, _HEADER + capacity)
        self.buffer = memoryview(self._map)
        self._head = 0  # writer side: next free position, monotonic

    @classmethod
    def create(
        cls, capacity: int, name: str = "opserve-ring", max_capacity: int | None = None
    ) -> ShmRing:
        fd = os.memfd_create(name, 0)
        os.ftruncate(fd, _HEADER + capacity)
        return cls(fd, capacity, max_capacity)

    def _remap(self, size: int) -> None:
        """Map the first `size` bytes of the file anew; views of the old mapping stay valid
        (it is closed when the last of them goes)."""
        self._map = mmap.mmap(self.fd, size)
        self.buffer = memoryview(self._map)

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

    def ensure(self, nbytes: int) -> None:
        """Grow an empty ring that cannot hold `nbytes` (to twice that, rounded up to a power
        of two, so that a second batch of the same size fits beside the first; at most
        `max_capacity`). A ring holding live data is left as it is."""
        needed = (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
        if needed <= self.capacity or self.capacity >= self.max_capacity:
            return
        (released,) = _RELEASED.unpack_from(self.buffer, 0)
        if released != self._head:
            return
        capacity = min(self.max_capacity, 1 << (2 * needed - 1).bit_length())
        os.ftruncate(self.fd, _HEADER + capacity)
        self._remap(_HEADER + capacity)
        self.capacity = capacity

    def write(self, data: bytes | memoryview) -> int | None:
        """Copy `data` into the ring: its offset, or None when there is no room."""
        offset = self.reserve(len(data))
        if offset is not None:
            self.buffer[offset : offset + len(data)] = data
        return offset

    # reader side -----------------------------------------------------------------------------
    def view(self, offset: int, nbytes: int) -> memoryview:
        """The bytes a message points at, mapping the grown file first when they lie past the
        current mapping."""
        if offset + nbytes > len(self.buffer):
            self._remap(os.fstat(self.fd).st_size)
        return self.buffer[offset : offset + nbytes]

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
