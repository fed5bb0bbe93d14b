"""Triton's system shared memory: the registry of regions a client has registered.

A region is a slice (`offset`, `byte_size`) of a POSIX shared-memory object (`/dev/shm/<key>`),
mapped once when it is registered. A request's tensors are memoryviews of the mapping: an input
is copied from it straight into a worker's request ring, an output from the worker's response
ring straight into it. Each request holds leases on the regions it uses (`RegionLeases`); a region
with leases cannot be unregistered (Triton's rule), and a lease that was released writes nothing,
so a request that ends early never writes into a region after its answer. Errors use Triton's
words and codes. Protocol-free: both frontends parse their own parameters and call this.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from typing import Any

from opserve.errors import (
    AlreadyExistsError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    UnsupportedError,
)
from opserve.inference import InferenceResponse

SHM_ROOT = "/dev/shm"


@dataclass(slots=True, eq=False)
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    view: memoryview  # the region's bytes: the object's [offset, offset + byte_size)
    mapping: mmap.mmap | None
    fd: int  # kept open to notice an object shrunk under the mapping (touching it: SIGBUS)
    users: int = 0  # requests holding a lease

    def check_size(self) -> None:
        if os.fstat(self.fd).st_size < self.offset + self.byte_size:
            raise InvalidArgumentError(
                f"shared memory region '{self.name}' is smaller than when it was registered "
                f"(its object '{self.key}' was truncated); register it again"
            )

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "key": self.key,
            "offset": self.offset,
            "byte_size": self.byte_size,
        }

    def close(self) -> None:
        """Unmap, unless a request's tensor still points into the mapping: then the mapping
        goes when the last view does."""
        try:
            self.view.release()
        except BufferError:
            pass
        if self.mapping is not None:
            try:
                self.mapping.close()
            except BufferError:
                pass
            self.mapping = None
        os.close(self.fd)


class SharedMemoryRegistry:
    """The regions registered with this server, by name (one namespace, as in Triton)."""

    def __init__(self, root: str = SHM_ROOT) -> None:
        self.root = root
        self._regions: dict[str, Region] = {}

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if name in self._regions:
            raise AlreadyExistsError(f"shared memory region '{name}' already in manager")
        for what, value in (("offset", offset), ("byte_size", byte_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidArgumentError(
                    f"failed to register shared memory region '{name}': '{what}' must be a "
                    "non-negative integer"
                )
        fd = self._open(key)
        try:
            size = os.fstat(fd).st_size
            if offset + byte_size > size:
                raise InvalidArgumentError(
                    f"failed to register shared memory region '{name}': invalid args"
                )
            view, mapping = _map(fd, offset, byte_size, name)
        except BaseException:
            os.close(fd)
            raise
        self._regions[name] = Region(name, key, offset, byte_size, view, mapping, fd)

    def _open(self, key: str) -> int:
        """shm_open(key, O_RDWR) as glibc does it: one name under /dev/shm, no links."""
        name = key.lstrip("/")
        if not name or "/" in name or name in (".", ".."):
            raise InternalError(f"Unable to open shared memory region: '{key}'")
        try:
            return os.open(os.path.join(self.root, name), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            raise InternalError(f"Unable to open shared memory region: '{key}'") from None

    def unregister(self, name: str) -> None:
        """Forget a region (an unknown name is no error, as in Triton); refused while in use."""
        region = self._regions.get(name)
        if region is None:
            return
        if region.users:
            raise InternalError(
                f"Cannot unregister shared memory region '{name}', it is currently in use."
            )
        del self._regions[name]
        region.close()

    def unregister_all(self) -> None:
        failed = []
        for name in sorted(self._regions):
            try:
                self.unregister(name)
            except InternalError:
                failed.append(name)
        if failed:
            raise InternalError(
                "Failed to unregister the following system shared memory regions: "
                + "".join(f"{name} ," for name in failed)
            )

    def status(self, name: str = "") -> list[dict[str, Any]]:
        """Every region (sorted by name), or the one named."""
        if not name:
            return [self._regions[n].status() for n in sorted(self._regions)]
        region = self._regions.get(name)
        if region is None:
            raise NotFoundError(f"Unable to find system shared memory region: '{name}'")
        return [region.status()]

    def has(self, name: str) -> bool:
        return name in self._regions

    def leases(self) -> RegionLeases:
        """The regions one request uses; release them when the request is over."""
        return RegionLeases(self)

    def _lease(self, name: str, offset: int, byte_size: int) -> tuple[Region, memoryview]:
        region = self._regions.get(name)
        if region is None:
            raise NotFoundError(f"Unable to find shared memory region: '{name}'")
        if offset < 0 or offset >= max(region.byte_size, 1):
            raise InvalidArgumentError(f"Invalid offset for shared memory region: '{name}'")
        if byte_size < 0 or offset + byte_size > region.byte_size:
            raise InvalidArgumentError(
                f"Invalid offset + byte size for shared memory region: '{name}'"
            )
        region.check_size()
        region.users += 1
        return region, region.view[offset : offset + byte_size]


@dataclass(slots=True, eq=False)
class OutputBuffer:
    """Where the client wants one output: a slice of a region. The server writes the output's
    raw bytes there (BYTES as length-prefixed elements), as Triton does."""

    name: str
    view: memoryview
    written: memoryview | None = None
    # set when its request's leases are released (no link back to them: that would make a
    # reference cycle of every request in shared memory)
    released: bool = False

    def write(self, data: bytes | memoryview) -> memoryview:
        """Copy `data` to the front of the slice: the bytes written, as a view."""
        size = len(data)
        if size > len(self.view):
            raise InternalError(
                f"shared memory size specified with the request for output '{self.name}' "
                f"({len(self.view)} bytes) should be at least {size} bytes to hold the results"
            )
        target = self.view[:size]
        if not self.released:  # a request that is over writes nothing
            target[:] = data
        self.written = target
        return target


@dataclass(slots=True, eq=False)
class RegionLeases:
    """The regions one request reads its inputs from and writes its outputs to."""

    registry: SharedMemoryRegistry
    outputs: dict[str, OutputBuffer] = field(default_factory=dict)
    released: bool = False
    _held: list[Region] = field(default_factory=list)

    def input(self, region: str, offset: int, byte_size: int) -> memoryview:
        """An input's data: a view of the region, bounds-checked."""
        held, view = self.registry._lease(region, offset, byte_size)
        self._held.append(held)
        return view

    def output(self, tensor: str, region: str, offset: int, byte_size: int) -> OutputBuffer:
        held, view = self.registry._lease(region, offset, byte_size)
        self._held.append(held)
        buffer = OutputBuffer(tensor, view)
        self.outputs[tensor] = buffer
        return buffer

    def place_outputs(self, response: InferenceResponse) -> None:
        """Write the outputs that did not come straight from a worker's ring (a cached
        response, say) into their regions."""
        for tensor in response.outputs:
            buffer = self.outputs.get(tensor.name)
            if buffer is not None and tensor.data is not buffer.written:
                tensor.data = buffer.write(tensor.data)

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        for region in self._held:
            region.users -= 1
        self._held.clear()
        for buffer in self.outputs.values():
            buffer.released = True


@dataclass(slots=True)
class PendingLeases:
    """A request's leases while a frontend decodes it: taken at its first tensor in shared
    memory, so a request without one costs nothing."""

    registry: SharedMemoryRegistry | None
    taken: RegionLeases | None = None

    def get(self) -> RegionLeases:
        if self.taken is None:
            if self.registry is None:
                raise UnsupportedError("shared memory is not available here")
            self.taken = self.registry.leases()
        return self.taken

    def release(self) -> None:
        if self.taken is not None:
            self.taken.release()


def _map(fd: int, offset: int, byte_size: int, name: str) -> tuple[memoryview, mmap.mmap | None]:
    """Map [offset, offset + byte_size) of the object; mmap wants a page-aligned start."""
    if byte_size == 0:
        return memoryview(bytearray()), None
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    try:
        mapping = mmap.mmap(
            fd,
            offset + byte_size - start,
            flags=mmap.MAP_SHARED,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=start,
        )
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(
            f"failed to register shared memory region '{name}': unable to process address "
            f"space{exc}"
        ) from None
    return memoryview(mapping)[offset - start :], mapping
