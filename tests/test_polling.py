"""Polling rather than sleeping while requests are in flight: when the event loop polls, for how
long, and what the worker of an execution is told."""

from __future__ import annotations

import asyncio

import pytest

from opserve import polling
from opserve.polling import Polling


def test_the_worker_polls_long_only_while_the_server_holds_one_request() -> None:
    idle = Polling(0)
    assert idle.worker_budget_us() == 0  # --busy-poll-us 0: never

    async def scenario() -> None:
        poller = Polling(500)
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
        poller = Polling(500)
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
        poller = Polling(20_000)  # 20 ms
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


class FakeClock:
    """`time` for the polling module, on a clock the test moves."""

    def __init__(self) -> None:
        self.now_ns = 1_000_000_000

    def monotonic_ns(self) -> int:
        return self.now_ns


def test_the_loop_polls_under_load_too_until_a_budget_after_the_last_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock()
    monkeypatch.setattr(polling, "time", clock)

    async def rounds() -> None:
        for _ in range(3):
            await asyncio.sleep(0)

    async def scenario() -> None:
        poller = Polling(1_000)  # 1 ms
        poller.began()
        poller.began()  # two at once: the loop keeps polling, the worker polls a share
        clock.now_ns += 900_000
        await rounds()
        assert poller.polling and poller.worker_budget_us() == 500
        poller.ended()  # each end starts the budget again
        clock.now_ns += 900_000
        await rounds()
        assert poller.polling
        poller.ended()
        clock.now_ns += 900_000
        await rounds()
        assert poller.polling  # 0.9 ms after the last request ended
        clock.now_ns += 200_000
        await rounds()
        assert not poller.polling
        assert Polling(0).worker_budget_us() == 0

    asyncio.run(scenario())


def test_a_negative_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="--busy-poll-us"):
        Polling(-1)
