"""A load that fails in a way nothing foresaw (a bug, say) loses that model only: it becomes
UNAVAILABLE with the cause as its reason, and no worker process of it is left running. A
message too large for the worker channel is refused as an error, not a crash."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from opserve.errors import InvalidArgumentError
from opserve.repository import ModelManager
from opserve.repository.manager import ModelState
from opserve.workers import channel
from opserve.workers.messages import Done
from tests.test_python_models import place_python_model


def test_an_unforeseen_error_while_loading_leaves_no_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    place_python_model(tmp_path, "add_sub")

    async def broken_open(self, model, entry) -> None:
        raise RuntimeError("a bug after the workers started")

    monkeypatch.setattr(ModelManager, "_open", broken_open)

    async def load() -> tuple[list[tuple[ModelState, str]], list[object]]:
        manager = ModelManager([tmp_path])
        started: list[object] = []
        start = ModelManager._start_instances

        async def recording(self, model, entry) -> None:
            await start(self, model, entry)
            started.extend(entry.workers)

        monkeypatch.setattr(ModelManager, "_start_instances", recording)
        with pytest.raises(InvalidArgumentError, match="load failed for model 'add_sub'"):
            await manager.load("add_sub")
        model = manager.models["add_sub"]
        states = [(e.state, e.reason) for e in model.versions.values()]
        await manager.shutdown()
        return states, started

    states, started = asyncio.run(load())
    assert states == [
        (ModelState.UNAVAILABLE, "internal error: RuntimeError: a bug after the workers started")
    ]
    assert started and not any(worker.alive for worker in started)  # type: ignore[attr-defined]


def test_a_message_over_what_the_channel_carries_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert channel.decode(channel.encode(Done(7))[channel.FRAME.size :]) == Done(7)
    monkeypatch.setattr(channel, "MAX_MESSAGE_BYTES", 8)
    with pytest.raises(InvalidArgumentError, match="more than the 8 one can carry"):
        channel.encode(Done(7))
