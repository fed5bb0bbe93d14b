"""The registry of shared-memory regions on its own: mapping, bounds, leases, Triton's words.

Objects are plain files in a temporary folder standing in for /dev/shm (the registry maps them
the same way); no server.
"""

from __future__ import annotations

import gc
import mmap
import os
from pathlib import Path

import pytest

from opserve.errors import (
    AlreadyExistsError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
)
from opserve.inference import InferenceResponse, Tensor
from opserve.shared_memory import OutputBuffer, RegionLeases, SharedMemoryRegistry

SIZE = 3 * mmap.ALLOCATIONGRANULARITY  # room for a registration at an unaligned offset


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "obj").write_bytes(bytes(i % 251 for i in range(SIZE)))
    return tmp_path


@pytest.fixture
def registry(root: Path) -> SharedMemoryRegistry:
    return SharedMemoryRegistry(str(root))


def test_register_status_unregister(registry: SharedMemoryRegistry) -> None:
    registry.register("b", "/obj", 0, 64)
    registry.register("a", "obj", 100, 28)  # the leading slash is optional, as for shm_open
    assert registry.status() == [
        {"name": "a", "key": "obj", "offset": 100, "byte_size": 28},
        {"name": "b", "key": "/obj", "offset": 0, "byte_size": 64},
    ]
    assert registry.status("b") == [{"name": "b", "key": "/obj", "offset": 0, "byte_size": 64}]
    registry.unregister("b")
    registry.unregister("b")  # unknown: no error, as in Triton
    assert [r["name"] for r in registry.status()] == ["a"]
    registry.unregister_all()
    assert registry.status() == []
    with pytest.raises(NotFoundError, match="Unable to find system shared memory region: 'b'"):
        registry.status("b")


def test_registration_errors(registry: SharedMemoryRegistry, root: Path) -> None:
    registry.register("r", "/obj", 0, 8)
    with pytest.raises(AlreadyExistsError, match="shared memory region 'r' already in manager"):
        registry.register("r", "/obj", 0, 8)
    (root / "elsewhere").mkdir()
    (root / "link").symlink_to(root / "obj")
    for key in ("/missing", "/elsewhere/obj", "/../obj", "/", "/..", "/link"):
        with pytest.raises(InternalError, match="Unable to open shared memory region"):
            registry.register("s", key, 0, 8)
    for offset, byte_size in ((0, SIZE + 1), (1, SIZE), (SIZE, 1)):
        with pytest.raises(InvalidArgumentError, match="'s': invalid args"):
            registry.register("s", "/obj", offset, byte_size)
    with pytest.raises(InvalidArgumentError, match="non-negative"):
        registry.register("s", "/obj", -1, 8)
    assert [r["name"] for r in registry.status()] == ["r"]


def test_an_unaligned_region_maps_the_right_bytes(registry: SharedMemoryRegistry) -> None:
    offset = mmap.ALLOCATIONGRANULARITY + 100
    registry.register("r", "/obj", offset, 64)
    leases = registry.leases()
    view = leases.input("r", 4, 8)
    assert bytes(view) == bytes((offset + 4 + i) % 251 for i in range(8))


def test_lease_bounds(registry: SharedMemoryRegistry) -> None:
    registry.register("r", "/obj", 0, 64)
    leases = registry.leases()
    with pytest.raises(NotFoundError, match="Unable to find shared memory region: 'x'"):
        leases.input("x", 0, 4)
    with pytest.raises(InvalidArgumentError, match="Invalid offset for shared memory region"):
        leases.input("r", 64, 0)
    with pytest.raises(InvalidArgumentError, match="Invalid offset \\+ byte size"):
        leases.input("r", 60, 8)
    assert len(leases.input("r", 60, 4)) == 4
    assert len(leases.input("r", 0, 64)) == 64


def test_a_region_in_use_stays_until_released(registry: SharedMemoryRegistry) -> None:
    registry.register("in", "/obj", 0, 8)
    registry.register("out", "/obj", 8, 8)
    registry.register("idle", "/obj", 16, 8)
    leases = registry.leases()
    leases.input("in", 0, 8)
    leases.output("OUTPUT0", "out", 0, 8)
    with pytest.raises(
        InternalError, match="Cannot unregister shared memory region 'in', it is currently in use."
    ):
        registry.unregister("in")
    with pytest.raises(InternalError) as raised:
        registry.unregister_all()
    assert raised.value.message == (
        "Failed to unregister the following system shared memory regions: in ,out ,"
    )
    assert [r["name"] for r in registry.status()] == ["in", "out"]  # idle went
    leases.release()
    leases.release()  # twice is harmless
    registry.unregister_all()
    assert registry.status() == []


def test_outputs_are_written_into_the_object(registry: SharedMemoryRegistry, root: Path) -> None:
    registry.register("out", "/obj", 32, 16)
    leases = registry.leases()
    buffer = leases.output("OUTPUT0", "out", 4, 8)
    written = buffer.write(b"\x01\x02\x03")
    assert bytes(written) == b"\x01\x02\x03"
    assert (root / "obj").read_bytes()[36:40] == b"\x01\x02\x03" + bytes([39 % 251])
    with pytest.raises(
        InternalError,
        match=r"output 'OUTPUT0' \(8 bytes\) should be at least 9 bytes to hold the results",
    ):
        buffer.write(bytes(9))


def test_place_outputs_writes_what_did_not_come_from_a_worker(
    registry: SharedMemoryRegistry, root: Path
) -> None:
    registry.register("out", "/obj", 0, 8)
    leases = registry.leases()
    buffer = leases.output("OUTPUT0", "out", 0, 8)
    from_worker = Tensor("OUTPUT0", "UINT8", (4,), buffer.write(b"wwww"))
    leases.place_outputs(InferenceResponse("m", "1", [from_worker]))
    assert (root / "obj").read_bytes()[:4] == b"wwww"
    cached = Tensor("OUTPUT0", "UINT8", (4,), b"cccc")  # a cached response, say
    other = Tensor("OTHER", "UINT8", (4,), b"oooo")
    leases.place_outputs(InferenceResponse("m", "1", [cached, other]))
    assert (root / "obj").read_bytes()[:4] == b"cccc"
    assert other.data == b"oooo"


def test_a_released_lease_writes_nothing(registry: SharedMemoryRegistry, root: Path) -> None:
    """A request that is over (cancelled, timed out) must not write into a region the client
    may already use for something else."""
    registry.register("out", "/obj", 0, 8)
    leases = registry.leases()
    buffer = leases.output("OUTPUT0", "out", 0, 8)
    before = (root / "obj").read_bytes()[:8]
    leases.release()
    buffer.write(b"late")
    assert (root / "obj").read_bytes()[:8] == before


def test_leases_are_freed_without_the_cycle_collector(registry: SharedMemoryRegistry) -> None:
    """A request's leases and its output buffers do not refer to each other both ways: once
    the request is done they go at once, not at the next garbage collection."""
    registry.register("out", "/obj", 0, 8)
    leases = registry.leases()
    buffer = leases.output("OUTPUT0", "out", 0, 8)
    leases.release()
    assert buffer.released
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        del leases, buffer
        gc.collect()
        assert not [o for o in gc.garbage if isinstance(o, (RegionLeases, OutputBuffer))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def test_unregistering_while_a_view_lives_does_not_crash(registry: SharedMemoryRegistry) -> None:
    """A tensor may still point into the mapping after its lease went: the mapping stays
    until the view goes, and unregistering works."""
    registry.register("r", "/obj", 0, 8)
    leases = registry.leases()
    view = leases.input("r", 0, 8)
    leases.release()
    registry.unregister("r")
    assert bytes(view) == bytes(range(8))


def test_a_truncated_object_is_refused_not_touched(
    registry: SharedMemoryRegistry, root: Path
) -> None:
    """Touching a mapping past the end of its object kills the process (SIGBUS): a region
    whose object shrank is refused before any tensor is read from or written to it."""
    registry.register("r", "/obj", 0, 64)
    os.truncate(root / "obj", 32)
    with pytest.raises(InvalidArgumentError, match="smaller than when it was registered"):
        registry.leases().input("r", 0, 8)
    registry.unregister("r")  # the refused lease holds nothing
