"""The cycle collector's settings for a long-running process (opserve.collector)."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest

from opserve import collector


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def _cycle() -> weakref.ref[_Node]:
    """A two-object cycle nobody else holds; the weak reference says whether it was freed."""
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a)


@pytest.fixture(autouse=True)
def _collector_as_it_was() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.set_threshold(*threshold)
    gc.unfreeze()


def test_tune_raises_the_young_threshold_only() -> None:
    gc.set_threshold(700, 11, 12)
    collector.tune()
    assert gc.get_threshold() == (collector.YOUNG_THRESHOLD, 11, 12)


def test_settle_freezes_what_survives_and_a_later_settle_frees_its_cycles() -> None:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    held = weakref.ref(a)
    collector.settle()
    assert gc.get_freeze_count() > 0
    del a, b  # the frozen cycle is garbage now, out of reach of ordinary collections
    gc.collect()
    assert held() is not None
    collector.settle()  # unfreezes first
    assert held() is None


def test_cycles_made_after_settling_are_collected_as_usual() -> None:
    collector.settle()
    young = _cycle()
    gc.collect()
    assert young() is None


def test_a_burst_of_changes_settles_once_after_the_last() -> None:
    async def burst() -> tuple[int, int, int]:
        settler = collector.Settler(delay_s=0.05)
        for _ in range(5):
            settler.changed()
            await asyncio.sleep(0.01)
        during = settler.settled
        await asyncio.sleep(0.15)
        after = settler.settled
        settler.changed()
        settler.cancel()  # a stopping server does not settle
        await asyncio.sleep(0.1)
        return during, after, settler.settled

    assert asyncio.run(burst()) == (0, 1, 1)
