"""Bounded memos: what the request path remembers about requests like earlier ones."""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


def remember(memo: dict[K, V], key: K, value: V, bound: int) -> None:
    """Keep `value` under `key`; a new key past `bound` entries first forgets the oldest."""
    if key not in memo and len(memo) >= bound:
        del memo[next(iter(memo))]
    memo[key] = value
