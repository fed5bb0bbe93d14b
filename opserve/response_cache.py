"""Triton's response cache: `--cache-config local,size=BYTES` and `response_cache { enable: true }`.

A response is cached under a hash of everything that decides it: the model and version, every
input (name, datatype, shape and data), the requested outputs and the request's parameters. The
cache holds at most `size` bytes of output data (plus a small allowance per entry) and forgets
the least recently used entries first; a response larger than the whole cache is not kept.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from opserve.inference import InferenceRequest, InferenceResponse, Tensor

ENTRY_OVERHEAD = 256  # bytes charged per entry beyond its tensor data (key, names, shapes)


@dataclass(frozen=True)
class CacheSettings:
    size: int  # bytes


def parse_cache_config(values: list[str]) -> CacheSettings | None:
    """Triton's `--cache-config <cache>,<key>=<value>` flags (several may name one cache)."""
    settings: dict[str, str] = {}
    for value in values:
        name, _, setting = value.partition(",")
        if name != "local":
            raise ValueError(
                f"--cache-config: cache '{name}' is not available; the only cache is 'local'"
            )
        key, equals, setting_value = setting.partition("=")
        if not equals:
            raise ValueError(f"--cache-config '{value}' must read <cache>,<key>=<value>")
        if key != "size":
            raise ValueError(f"--cache-config: the local cache has no setting '{key}' (only size)")
        settings[key] = setting_value
    if not settings:
        return None
    try:
        size = int(settings["size"])
    except ValueError:
        raise ValueError("--cache-config local,size=BYTES needs a whole number of bytes") from None
    if size < 0:
        raise ValueError("--cache-config local,size=BYTES must not be negative")
    return CacheSettings(size)


def cache_key(request: InferenceRequest, model: str, version: int) -> bytes:
    """What decides a response, hashed."""
    digest = hashlib.blake2b(digest_size=32)
    digest.update(f"{model}\0{version}\0".encode())
    for tensor in sorted(request.inputs, key=lambda t: t.name):
        digest.update(f"{tensor.name}\0{tensor.datatype}\0{tensor.shape}\0".encode())
        digest.update(len(tensor.data).to_bytes(8, "little"))
        digest.update(tensor.data)
    outputs = sorted(request.requested_outputs) if request.requested_outputs is not None else None
    digest.update(repr(outputs).encode())
    digest.update(repr(sorted(request.parameters.items(), key=lambda p: p[0])).encode())
    return digest.digest()


@dataclass(frozen=True)
class _Entry:
    outputs: tuple[Tensor, ...]
    parameters: dict[str, Any]
    size: int


class ResponseCache:
    """A byte-bounded LRU map from `cache_key` to a response's outputs and parameters."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> InferenceResponse | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return InferenceResponse("", "", list(entry.outputs), parameters=dict(entry.parameters))

    def put(self, key: bytes, response: InferenceResponse) -> bool:
        """Keep a copy of `response`; False when it is too large for the cache."""
        outputs = tuple(
            Tensor(t.name, t.datatype, t.shape, bytes(t.data)) for t in response.outputs
        )
        size = ENTRY_OVERHEAD + sum(len(t.data) for t in outputs)
        if size > self.capacity:
            return False
        previous = self._entries.pop(key, None)
        if previous is not None:
            self.used -= previous.size
        while self._entries and self.used + size > self.capacity:
            _, evicted = self._entries.popitem(last=False)
            self.used -= evicted.size
        self._entries[key] = _Entry(outputs, dict(response.parameters), size)
        self.used += size
        return True
