"""The length-prefixed BYTES layout of the binary extension: pure functions, no server."""

from __future__ import annotations

import struct

import numpy as np

from opserve.datatypes import deserialize_bytes, serialize_bytes


def test_elements_of_every_kind_round_trip() -> None:
    elements = [b"ab", "é", b"", np.bytes_(b"x\x00y"), bytearray(b"z")]
    data = serialize_bytes(elements)
    assert data[:6] == struct.pack("<I", 2) + b"ab"
    assert deserialize_bytes(data) == [b"ab", "é".encode(), b"", b"x\x00y", b"z"]


def test_more_elements_than_a_chunk_keep_their_order() -> None:
    elements = [str(i).encode() for i in range(200_003)]  # several chunks and a remainder
    assert deserialize_bytes(serialize_bytes(elements)) == elements
    assert deserialize_bytes(serialize_bytes(iter(elements))) == elements  # any iterable
