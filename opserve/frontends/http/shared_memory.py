"""Triton's shared-memory extension over HTTP: `/v2/systemsharedmemory/...` and, answered as
Triton answers without GPUs, `/v2/cudasharedmemory/...`.

    GET  v2/{system,cuda}sharedmemory[/region/<name>]/status
    POST v2/{system,cuda}sharedmemory/region/<name>/register
    POST v2/{system,cuda}sharedmemory[/region/<name>]/unregister
"""

from __future__ import annotations

from typing import Any

from opserve.errors import InvalidArgumentError, NotFoundError
from opserve.shared_memory import SharedMemoryRegistry

KINDS = ("systemsharedmemory", "cudasharedmemory")


def route(parts: list[str]) -> tuple[str, str, str] | None:
    """(kind, region name or "", action) of a shared-memory path (after `v2`), else None."""
    if not parts or parts[0] not in KINDS:
        return None
    kind, rest = parts[0], parts[1:]
    name = ""
    if len(rest) == 3 and rest[0] == "region":
        name, rest = rest[1], rest[2:]
    if len(rest) != 1 or rest[0] not in ("status", "register", "unregister"):
        return None
    if rest[0] == "register" and not name:
        return None
    return kind, name, rest[0]


def handle(
    registry: SharedMemoryRegistry, kind: str, name: str, action: str, body: dict[str, Any]
) -> list[dict[str, Any]] | None:
    """The answer's JSON (status), or None for an empty 200 (register, unregister)."""
    if kind == "cudasharedmemory":
        return _cuda(registry, name, action)
    if action == "status":
        return registry.status(name)
    if action == "unregister":
        if name:
            registry.unregister(name)
        else:
            registry.unregister_all()
        return None
    key = body.get("key")
    if key is None:
        raise InvalidArgumentError("Shared memory register request has no 'key' field")
    if not isinstance(key, str):
        raise InvalidArgumentError("Shared memory register request: 'key' must be a string")
    if "byte_size" not in body:
        raise InvalidArgumentError("Shared memory register request has no 'byte_size' field")
    registry.register(name, key, body.get("offset", 0), body["byte_size"])
    return None


def _cuda(registry: SharedMemoryRegistry, name: str, action: str) -> list[dict[str, Any]] | None:
    """No CUDA shared memory here: nothing is registered, registering is refused."""
    if action == "register":
        raise InvalidArgumentError(
            f"failed to register CUDA shared memory region: '{name}', GPUs not supported"
        )
    if action == "status" and name:
        if registry.has(name):
            raise NotFoundError(
                f"The region named '{name}' is registered as system shared memory, not CUDA "
                "shared memory"
            )
        raise NotFoundError(f"Unable to find cuda shared memory region: '{name}'")
    return [] if action == "status" else None
