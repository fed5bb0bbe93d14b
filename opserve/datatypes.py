"""The tensor datatypes of the V2 protocol, the config's `TYPE_*` names, and numpy.

BYTES tensors travel, everywhere inside opserve, in the binary extension's own layout: each
element is a 4-byte little-endian length followed by its bytes. BF16 has no numpy type; its raw
data is carried as 16-bit words.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from itertools import chain

import numpy as np

from opserve.errors import InvalidArgumentError

# V2 datatype -> numpy dtype (None for BYTES, whose elements vary in size).
NUMPY_DTYPES: dict[str, np.dtype | None] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BF16": np.dtype("<u2"),
    "BYTES": None,
}

ITEM_SIZES: dict[str, int] = {
    name: dtype.itemsize for name, dtype in NUMPY_DTYPES.items() if dtype is not None
}

# config.pbtxt DataType enum names -> V2 datatype.
_CONFIG_TO_V2 = {
    "TYPE_BOOL": "BOOL",
    "TYPE_UINT8": "UINT8",
    "TYPE_UINT16": "UINT16",
    "TYPE_UINT32": "UINT32",
    "TYPE_UINT64": "UINT64",
    "TYPE_INT8": "INT8",
    "TYPE_INT16": "INT16",
    "TYPE_INT32": "INT32",
    "TYPE_INT64": "INT64",
    "TYPE_FP16": "FP16",
    "TYPE_FP32": "FP32",
    "TYPE_FP64": "FP64",
    "TYPE_STRING": "BYTES",
    "TYPE_BF16": "BF16",
}
_V2_TO_CONFIG = {v: k for k, v in _CONFIG_TO_V2.items()}

_NUMPY_TO_V2: dict[np.dtype, str] = {
    np.dtype(np.bool_): "BOOL",
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.uint16): "UINT16",
    np.dtype(np.uint32): "UINT32",
    np.dtype(np.uint64): "UINT64",
    np.dtype(np.int8): "INT8",
    np.dtype(np.int16): "INT16",
    np.dtype(np.int32): "INT32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.float16): "FP16",
    np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64",
}


def config_to_v2(config_type: str) -> str:
    """`TYPE_FP32` -> `FP32`; `TYPE_STRING` -> `BYTES`."""
    try:
        return _CONFIG_TO_V2[config_type]
    except KeyError:
        raise InvalidArgumentError(f"unsupported data type '{config_type}'") from None


def v2_to_config(datatype: str) -> str:
    """`FP32` -> `TYPE_FP32`; `BYTES` -> `TYPE_STRING`."""
    try:
        return _V2_TO_CONFIG[datatype]
    except KeyError:
        raise InvalidArgumentError(f"unknown datatype '{datatype}'") from None


def numpy_to_v2(dtype: np.dtype) -> str:
    """The V2 datatype of a numpy array (object and string arrays are BYTES)."""
    if dtype.kind in ("O", "S", "U"):
        return "BYTES"
    try:
        return _NUMPY_TO_V2[dtype]
    except KeyError:
        raise InvalidArgumentError(f"numpy dtype {dtype} has no V2 datatype") from None


def element_count(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


_LENGTH = struct.Struct("<I")


def serialize_bytes(elements: Iterable[bytes | str]) -> bytes:
    """Elements -> the length-prefixed layout of the binary extension. The interleaving runs in
    C iterators (no Python bytecode per element): millions of strings take a fraction of the
    time a loop did, on the event loop of a frontend too."""
    items = [e if type(e) is bytes else _as_bytes(e) for e in elements]
    if len(items) <= _CHUNK:
        return _interleave(items)
    # in chunks: between them another thread may take the GIL (a frontend's event loop while
    # a large request is decoded in a thread)
    return b"".join(
        _interleave(items[start : start + _CHUNK]) for start in range(0, len(items), _CHUNK)
    )


_CHUNK = 65_536


def _interleave(items: list[bytes]) -> bytes:
    lengths = map(_LENGTH.pack, map(len, items))
    return b"".join(chain.from_iterable(zip(lengths, items, strict=True)))


def _as_bytes(element: bytes | str) -> bytes:
    return element.encode() if isinstance(element, str) else bytes(element)


def deserialize_bytes(buffer: bytes | memoryview) -> list[bytes]:
    """The length-prefixed layout -> elements. Raises if the buffer is malformed."""
    view = memoryview(buffer)
    elements: list[bytes] = []
    offset, end = 0, len(view)
    while offset < end:
        if offset + 4 > end:
            raise InvalidArgumentError("malformed BYTES tensor: truncated length prefix")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > end:
            raise InvalidArgumentError("malformed BYTES tensor: element runs past the data")
        elements.append(bytes(view[offset : offset + length]))
        offset += length
    return elements


def count_bytes_elements(buffer: bytes | memoryview) -> int:
    """How many elements a length-prefixed BYTES buffer holds; raises if malformed."""
    view = memoryview(buffer)
    count, offset, end = 0, 0, len(view)
    while offset < end:
        if offset + 4 > end:
            raise InvalidArgumentError("malformed BYTES tensor: truncated length prefix")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4 + length
        if offset > end:
            raise InvalidArgumentError("malformed BYTES tensor: element runs past the data")
        count += 1
    return count
