"""Polling rather than sleeping at low load: when the event loop polls, for how long, and what
the worker of an execution is told."""

from __future__ import annotations

import asyncio

import pytest

from opserve import polling
from opserve.polling import LowLoadPolling


def test_the_worker_polls_long_only_while_the_server_holds_one_request() -> None:
    idle = LowLoadPolling(0)
    assert idle.worker_budget_us() == 0  # --busy-poll-us 0: never

    async def scenario() -> None:
        poller = LowLoadPolling(500)
        assert poller.worker_budget_us() == 500
        poller.began()
        assert poller.in_flight == 1 and poller.worker_budget_us() == 500
        poller.began()  # two at once: the cores are needed; the worker polls a short while only
        assert poller.worker_budget_us() == 250
        poller.ended()
        assert poller.in_flight == 1
        # still busy a moment ago: the short while, until the server has been quiet a while
        assert poller.worker_budget_us() == 250
        poller.ended()

    asyncio.run(scenario())


def test_quiet_again_after_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(polling, "QUIET_NS", 20_000_000)

    async def scenario() -> None:
        poller = LowLoadPolling(500)
        poller.began()
        poller.began()
        poller.ended()
        poller.ended()
        await asyncio.sleep(0.001)  # the round in flight ends the polling
        assert poller.worker_budget_us() == 250 and not poller.polling
        await asyncio.sleep(0.03)
        assert poller.worker_budget_us() == 500
        poller.began()
        assert poller.polling

    asyncio.run(scenario())


def test_the_loop_polls_for_its_budget_then_sleeps_and_stays_responsive() -> None:
    async def scenario() -> None:
        poller = LowLoadPolling(20_000)  # 20 ms
        loop = asyncio.get_running_loop()
        poller.began()
        assert poller.polling
        fired = loop.create_future()
        loop.call_later(0.005, fired.set_result, True)  # timers still fire while it polls
        assert await asyncio.wait_for(fired, 1)
        assert poller.polling
        poller.ended()  # the budget starts again from the end of the request
        await asyncio.sleep(0.06)
        assert not poller.polling

    asyncio.run(scenario())


def test_no_polling_once_two_requests_are_in_flight() -> None:
    async def scenario() -> None:
        poller = LowLoadPolling(1_000_000)  # a second
        poller.began()
        assert poller.polling
        poller.began()
        await asyncio.sleep(0.01)  # the next round sees two in flight and stops
        assert not poller.polling
        poller.ended()
        poller.ended()
        assert not poller.polling  # not quiet yet

    asyncio.run(scenario())


def test_a_negative_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="--busy-poll-us"):
        LowLoadPolling(-1)
