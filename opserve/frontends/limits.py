"""What a client may cost the server: body sizes (inflated ones too), how long a request may
take to arrive, and how many connections may be open. Protocol-free: the HTTP protocol and a
gRPC transport call these, each words the refusal in its own protocol.
"""

from __future__ import annotations

import resource
import zlib
from dataclasses import dataclass

from opserve.errors import InvalidArgumentError, UnsupportedError

HTTP_DEFAULT_MAX_INPUT_SIZE = 1 << 26  # 64 MiB, Triton's --http-max-input-size default
GRPC_DEFAULT_MAX_INPUT_SIZE = (1 << 31) - 1  # Triton's gRPC message size (INT32_MAX)
_INFLATE_STEP = 1 << 20  # output bytes inflated per step


def default_max_connections() -> int:
    """Half the process's file-descriptor limit: the other half stays for workers, rings, model
    files, the gRPC and metrics servers, so that the server keeps accepting at the limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 65536
    return max(16, soft // 2)


@dataclass(frozen=True)
class ConnectionLimits:
    """The bounds of the HTTP protocol (and, for a transport of our own, of gRPC)."""

    max_input_size: int = HTTP_DEFAULT_MAX_INPUT_SIZE  # a body, after any inflating
    header_timeout_s: float = 30.0  # request line and headers, from their first byte
    body_timeout_s: float = 60.0  # longest pause while a body arrives
    first_request_timeout_s: float = 30.0  # a new connection's wait for its first byte
    keep_alive_timeout_s: float = 300.0  # between requests
    max_connections: int = 0  # 0: default_max_connections()

    def __post_init__(self) -> None:
        if self.max_connections == 0:
            object.__setattr__(self, "max_connections", default_max_connections())


def body_too_large(size: int | None, limit: int, flag: str = "--http-max-input-size") -> str:
    """Triton's words for a body over the limit (`size` None: still arriving)."""
    of = "" if size is None else f" of {size} bytes"
    return (
        f"Request body size{of} exceeds the maximum allowed value of {limit} bytes. "
        f"Use {flag} to increase the limit."
    )


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """A request body in its `Content-Encoding` (gzip, deflate; identity: as it is), inflated
    step by step and refused as soon as it grows past `limit` (Triton's words), so that a small
    bomb never becomes a large body."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise UnsupportedError(f"unsupported Content-Encoding '{encoding}'")
    gzip = encoding != "deflate"
    sink = _Inflated(limit)
    view = memoryview(body)
    start = 0
    try:
        while True:  # one pass per gzip member (a deflate body has one)
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if gzip else zlib.MAX_WBITS)
            while not inflater.eof:
                if inflater.unconsumed_tail:
                    chunk = inflater.decompress(inflater.unconsumed_tail, sink.room())
                elif start < len(view):
                    piece = view[start : start + _INFLATE_STEP]
                    start += len(piece)
                    chunk = inflater.decompress(piece, sink.room())
                else:  # all of the input is in: what the inflater still holds
                    chunk = inflater.decompress(b"", sink.room())
                    if not chunk:
                        break
                sink.add(chunk)
            if not inflater.eof:
                raise InvalidArgumentError(
                    f"failed to decompress the {encoding} request body: it ends before its "
                    "end-of-stream marker"
                )
            start -= len(inflater.unused_data)
            if not gzip or start >= len(view):
                break
    except zlib.error as exc:
        raise InvalidArgumentError(
            f"failed to decompress the {encoding} request body: {exc}"
        ) from None
    return b"".join(sink.parts)


class _Inflated:
    """Inflated output so far, never more than the limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.parts: list[bytes] = []

    def room(self) -> int:
        """How much to inflate next: a step, or one byte past the limit (never 0: unbounded)."""
        return min(_INFLATE_STEP, self.limit - self.size + 1)

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise InvalidArgumentError(
                f"Decompressed data size exceeds the maximum allowed value of {self.limit} "
                "bytes. Use --http-max-input-size to increase the limit."
            )
        self.parts.append(chunk)
