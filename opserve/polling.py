"""Polling instead of sleeping while the server is lightly loaded (`--busy-poll-us`).

Waking a process that sleeps costs more than the work of a small request: on the 2-core VM
these numbers come from, a round trip between two processes over a socket pair takes 75-99 µs
when each side sleeps until the other writes, and 9 µs when each side polls. An inference at
concurrency 1 crosses four such wake-ups (client to server, server to worker, worker to server,
server to client), and they were most of the gap to Triton there.

While the server has held at most one request at a time for a while (`QUIET_NS`), the cores
are mostly idle, so it keeps its event loop polling for a while (`budget_us`) after a request
begins and after it ends, instead of sleeping in `epoll_wait`, and tells the worker that runs
the request to poll for its next message for as long (`Execute.poll_us`). Once two requests
are in flight at once the server has work waiting and the cores are needed: the event loop
does not poll until it is quiet again (measured: polling whenever the count fell to one cost
20 % of the throughput at concurrency 4), and a worker polls for half the budget only,
for an execution that follows its answer within the server's turnaround spares both sides a
wake-up; the worker itself polls only while its recent waits were shorter than its budget
(`BlockingChannel.receive`). Measured A B over three rounds: about 1.85x the throughput at
concurrency 1, unchanged beyond the noise at 4 and 8. A polling process yields its core on
every round (`sched_yield`), so anything else runnable on that core runs first.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio

DEFAULT_BUDGET_US = 1000  # `--busy-poll-us`: a little more than a request's round trip here
QUIET_NS = 50_000_000  # no polling until this long after two requests were in flight at once
LOADED_SHARE = 2  # under load a worker polls for this share of the budget (see above)


def checked_budget(budget_us: int) -> int:
    """`--busy-poll-us` as given, refused when negative."""
    if budget_us < 0:
        raise ValueError(f"--busy-poll-us must not be negative, not {budget_us}")
    return budget_us


class LowLoadPolling:
    """Counts the server's requests in flight, and polls the event loop while there are few."""

    def __init__(self, budget_us: int = 0) -> None:
        self.budget_us = checked_budget(budget_us)
        self.in_flight = 0
        self._until_ns = 0  # poll until then (monotonic)
        self._busy_until_ns = 0  # no polling before then (monotonic)
        self._loop: asyncio.AbstractEventLoop | None = None  # set while polling

    @property
    def polling(self) -> bool:
        return self._loop is not None

    def began(self) -> None:
        """A request was accepted (from the event loop)."""
        self.in_flight += 1
        if self.in_flight > 1:
            self._busy_until_ns = time.monotonic_ns() + QUIET_NS
        else:
            self._extend()

    def ended(self) -> None:
        """A request was answered, or failed."""
        self.in_flight -= 1
        if self.in_flight <= 1:
            self._extend()

    def worker_budget_us(self) -> int:
        """How long the worker of an execution starting now should poll for its next message."""
        if self._quiet(time.monotonic_ns()):
            return self.budget_us
        return self.budget_us // LOADED_SHARE

    def _quiet(self, now_ns: int) -> bool:
        """At most one request in flight, and none other at once for `QUIET_NS`."""
        return self.in_flight <= 1 and now_ns >= self._busy_until_ns

    def _extend(self) -> None:
        if not self.budget_us:
            return
        now = time.monotonic_ns()
        if not self._quiet(now):
            return
        self._until_ns = now + self.budget_us * 1000
        if self._loop is None:
            # imported here: the command line imports this module before anything may load
            # OpenSSL, which asyncio does (see `opserve.cli`)
            from asyncio import get_running_loop

            self._loop = get_running_loop()
            self._loop.call_soon(self._poll)

    def _poll(self) -> None:
        """One round: while a callback is ready the loop looks for I/O without waiting."""
        loop = self._loop
        assert loop is not None
        if self.in_flight > 1 or time.monotonic_ns() >= self._until_ns or loop.is_closed():
            self._loop = None
            return
        os.sched_yield()
        loop.call_soon(self._poll)
