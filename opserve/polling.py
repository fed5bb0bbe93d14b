"""Polling instead of sleeping while requests are in flight (`--busy-poll-us`).

Waking a process that sleeps costs more than the work of a small request: on the 2-core VM
these numbers come from, a round trip between two processes over a socket pair takes 75-99 µs
when each side sleeps until the other writes, and 9 µs when each side polls. An inference at
concurrency 1 crosses four such wake-ups (client to server, server to worker, worker to server,
server to client), and they were most of the gap to Triton there.

The server's event loop is on the path of every request, so while any request is in flight it
polls rather than sleeps in `epoll_wait`, for `budget_us` after each request begins and after
it ends: an answer from a worker or the next request of a client is seen at once, without a
wake-up. A worker is on the path of its own executions only. While the server has held at most
one request for a while (`QUIET_NS`) the cores are otherwise idle, and the worker of an
execution polls for its next message (`Execute.poll_us`) for the whole budget; under load, for
a share of it (`LOADED_SHARE`): its polling then takes the core from the server, the side that
is behind, while a next execution that follows its answer at once still spares a wake-up. The
worker polls only while its recent waits were shorter than its budget
(`BlockingChannel.receive`). A polling thread yields its core on every round (`sched_yield`),
so anything else runnable on that core, in the server's scheduling group, runs first.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio

DEFAULT_BUDGET_US = 1000  # `--busy-poll-us`: a little more than a request's round trip here
QUIET_NS = 50_000_000  # a worker polls long once this long has passed with one request at most
LOADED_SHARE = 2  # under load a worker polls for this share of the budget (see above)


def checked_budget(budget_us: int) -> int:
    """`--busy-poll-us` as given, refused when negative."""
    if budget_us < 0:
        raise ValueError(f"--busy-poll-us must not be negative, not {budget_us}")
    return budget_us


class Polling:
    """Counts the server's requests in flight, polls the event loop while there are any, and
    tells a worker whether to poll."""

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
        now = time.monotonic_ns()
        if self.in_flight > 1:
            self._busy_until_ns = now + QUIET_NS
        self._extend(now)

    def ended(self) -> None:
        """A request was answered, or failed."""
        self.in_flight -= 1
        self._extend(time.monotonic_ns())

    def worker_budget_us(self) -> int:
        """How long the worker of an execution starting now should poll for its next message:
        the budget while the server is quiet, else a share of it."""
        if self.in_flight <= 1 and time.monotonic_ns() >= self._busy_until_ns:
            return self.budget_us
        return self.budget_us // LOADED_SHARE

    def _extend(self, now_ns: int) -> None:
        """The event loop polls for the budget from `now_ns` on."""
        if not self.budget_us:
            return
        self._until_ns = now_ns + self.budget_us * 1000
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
        if time.monotonic_ns() >= self._until_ns or loop.is_closed():
            self._loop = None
            return
        os.sched_yield()
        loop.call_soon(self._poll)
