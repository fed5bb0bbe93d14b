"""The shared-memory ring and its out-of-order releases, in one process."""

from __future__ import annotations

import os
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


def test_an_empty_ring_grows_for_a_batch_and_the_reader_maps_the_larger_file() -> None:
    writer = ShmRing.create(1024, max_capacity=1 << 20)
    reader = ShmRing(os.dup(writer.fd), 1024)  # the other process: the same memfd
    try:
        writer.ensure(3 * 1000)
        assert writer.capacity == 8192  # twice the batch, a power of two: room for a second
        offsets = [writer.write(bytes([n]) * 1000) for n in range(3)]
        assert None not in offsets and max(o for o in offsets if o is not None) > 1024
        for n, offset in enumerate(offsets):
            assert offset is not None
            assert bytes(reader.view(offset, 1000)) == bytes([n]) * 1000
        reader.release(writer.head)
        writer.ensure(100)  # small enough already: no change
        assert writer.capacity == 8192
    finally:
        reader.close()
        writer.close()


def test_a_ring_with_live_data_or_at_its_limit_does_not_grow() -> None:
    ring = ShmRing.create(1024, max_capacity=4096)
    try:
        assert ring.write(b"x" * 64) is not None  # not yet released by the reader
        ring.ensure(2000)
        assert ring.capacity == 1024
        ring.release(ring.head)
        ring.ensure(1 << 20)  # larger than the limit: grows to the limit only
        assert ring.capacity == 4096
        assert ring.write(b"y" * 5000) is None  # still too large: sent inline
    finally:
        ring.close()
