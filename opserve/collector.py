"""Python's cycle collector in a long-running process: the server and its workers.

Reference counting frees a finished request at once (it leaves no cycle), so the cycle collector
finds little; what it costs is walking what is alive. With CPython's defaults (a young
collection every 700 net allocations, a full one once enough objects have been promoted) two
things went wrong under load, measured with `gc.callbacks` in the server at concurrency 64
over HTTP:

- Every young collection promotes the requests in flight (64 of them, some thirty objects each),
  so full collections came every second or so, and each walked the whole heap: the modules, the
  protobuf descriptors, the models' configs, about 30 ms each. Those pauses were the requests'
  99th percentile latency (34 ms, against Triton's 15). Collecting once and then freezing what
  survives (`gc.freeze`) takes the heap as it was after loading out of every later collection:
  a full collection then walks only what was promoted since.
- 1,600 young collections in ten seconds (150 ms): the threshold is raised to
  `YOUNG_THRESHOLD`, about 130 collections in the same run.

What is frozen is still freed by reference counting; only cycles among frozen objects would
wait, so `settle` first unfreezes and collects: the server settles again after its repository
changes (an unloaded model's cycles are freed then), a dedicated worker once its model has
loaded (it ends with its model).
"""

from __future__ import annotations

import gc
import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio

log = logging.getLogger(__name__)

YOUNG_THRESHOLD = 10_000  # net allocations between young collections (CPython's default: 700)
SETTLE_DELAY_S = 1.0  # after the repository's last change, the server settles once


def tune() -> None:
    """Fewer young collections; the older generations' thresholds stay."""
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)


def settle() -> None:
    """Collect everything once (what an earlier settle froze included), then leave the
    survivors out of later collections."""
    started = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    log.debug(
        "collected the heap and froze %d objects in %.1f ms",
        gc.get_freeze_count(),
        (time.perf_counter() - started) * 1e3,
    )


class Settler:
    """Settles the heap once, `delay_s` after the last of a burst of changes (a start-up or a
    poll loads many models; one collection serves them all)."""

    def __init__(self, delay_s: float = SETTLE_DELAY_S) -> None:
        self.delay_s = delay_s
        self.settled = 0  # how many times it has settled
        self._timer: asyncio.TimerHandle | None = None

    def changed(self) -> None:
        """Something was loaded or unloaded: settle after `delay_s` without another change."""
        import asyncio  # here: a worker imports this module without an event loop

        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self.delay_s, self._settle)

    def _settle(self) -> None:
        self._timer = None
        settle()
        self.settled += 1

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
