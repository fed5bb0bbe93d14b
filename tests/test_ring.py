"""The shared-memory ring and its out-of-order releases, in one process."""

from __future__ import annotations

import struct

from opserve.workers.ring import Releases, ShmRing


def released(ring: ShmRing) -> int:
    return struct.unpack_from("<Q", ring.buffer, 0)[0]


def test_a_full_ring_refuses_and_a_release_frees_space() -> None:
    ring = ShmRing.create(256)
    try:
        assert ring.write(b"x" * 128) is not None
        assert ring.write(b"y" * 128) is not None
        assert ring.write(b"z") is None  # full: the sender ships it inline
        ring.release(ring.head)
        offset = ring.write(b"z")
        assert offset is not None and bytes(ring.buffer[offset : offset + 1]) == b"z"
    finally:
        ring.close()


def test_releases_advance_over_the_longest_finished_prefix() -> None:
    ring = ShmRing.create(1024)
    try:
        releases = Releases(ring)
        first, second, third = (releases.register(end) for end in (64, 128, 192))
        releases.finish(second)
        assert released(ring) == 0  # the first still holds its space
        releases.finish(first)
        assert released(ring) == 128
        releases.finish(third)
        assert released(ring) == 192
    finally:
        ring.close()
