"""How an ensemble whose steps answer once runs its requests (`EnsembleScheduler.submit`), from
its steps' answers, without a server: the step runner here is the test's, and it answers, fails
or holds each step request as the test says."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from opserve.ensemble import build_graph
from opserve.ensemble_scheduler import EnsembleScheduler, StepOutcome
from opserve.errors import InternalError, InvalidArgumentError, UnavailableError
from opserve.inference import InferenceRequest, InferenceResponse, Tensor
from opserve.stats import VersionStats
from tests.test_ensemble_graph import DIAMOND, ensemble

X = Tensor("X", "FP32", (1, 4), bytes(16))


class Runner:
    """Step requests as the dataplane would take them: `submit` queues each one here, the test
    answers it with `answer` or `fail`; models in `via_task` need `infer`, those in `refused`
    are refused before they are queued."""

    def __init__(self) -> None:
        self.waiting: dict[str, tuple[InferenceRequest, Callable[[StepOutcome], None]]] = {}
        self.cancelled: list[str] = []
        self.via_task: set[str] = set()
        self.refused: set[str] = set()

    def submit(
        self, request: InferenceRequest, done: Callable[[StepOutcome], None]
    ) -> Callable[[], None] | None:
        name = request.model_name
        if name in self.refused:
            raise InvalidArgumentError("unexpected shape for input 'X'")
        if name in self.via_task:
            return None
        self.waiting[name] = (request, done)
        return lambda: self.cancelled.append(name)

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        return output_of(request)

    def stream(self, request: InferenceRequest):  # pragma: no cover - no decoupled steps here
        raise NotImplementedError

    def answer(self, name: str, response: InferenceResponse | None = None) -> None:
        request, done = self.waiting.pop(name)
        done(response if response is not None else output_of(request))

    def fail(self, name: str, error: BaseException) -> None:
        self.waiting.pop(name)[1](error)


def output_of(request: InferenceRequest) -> InferenceResponse:
    """Each step model's output Y: its name, so the test sees which step wrote what."""
    return InferenceResponse(
        request.model_name, "1", [Tensor("Y", "FP32", (1, 4), request.model_name.encode() * 4)]
    )


def diamond(runner: Runner) -> EnsembleScheduler:
    """X -> a -> t; t -> b -> u; t -> c -> v; (u, v) -> d -> Y"""
    return EnsembleScheduler(
        "ensemble 'e'", build_graph(ensemble(*DIAMOND)), VersionStats(), frozenset(), runner
    )


def submitted(
    runner: Runner,
) -> tuple[EnsembleScheduler, asyncio.Future[InferenceResponse], Callable[[], object]]:
    """The diamond on `runner`, and a request to it (X in), started."""
    scheduler = diamond(runner)
    future, cancel = scheduler.submit(InferenceRequest("e", "", [X]), 1)
    return scheduler, future, cancel


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_steps_start_as_their_inputs_exist_and_the_last_answers() -> None:
    async def main() -> None:
        runner = Runner()
        scheduler, future, _ = submitted(runner)
        assert list(runner.waiting) == ["a"]
        assert runner.waiting["a"][0].inputs[0].data == X.data
        runner.answer("a")
        assert sorted(runner.waiting) == ["b", "c"]  # both read t: at once
        assert runner.waiting["b"][0].inputs[0].data == b"a" * 4
        runner.answer("c")
        assert list(runner.waiting) == ["b"]  # d waits for u too
        runner.answer("b")
        assert list(runner.waiting) == ["d"]
        assert {t.name: t.data for t in runner.waiting["d"][0].inputs} == {
            "A": b"b" * 4,
            "B": b"c" * 4,
        }
        assert not future.done()
        runner.answer("d")
        response = await future
        assert [(t.name, t.data) for t in response.outputs] == [("Y", b"d" * 4)]
        assert scheduler.stats.success.count == 1 and scheduler.stats.fail.count == 0

    asyncio.run(main())


def test_a_failing_step_fails_the_request_naming_it_and_cancels_the_others() -> None:
    async def main() -> None:
        runner = Runner()
        scheduler, future, _ = submitted(runner)
        runner.answer("a")
        runner.fail("b", UnavailableError("the worker crashed"))
        with pytest.raises(UnavailableError, match="in ensemble 'e', .*'b'.*the worker crashed"):
            await future
        assert runner.cancelled == ["c"]
        runner.answer("c")  # an answer after the end changes nothing
        assert not runner.waiting and scheduler.stats.fail.count == 1

    asyncio.run(main())


def test_a_client_that_leaves_cancels_the_running_steps() -> None:
    async def main() -> None:
        runner = Runner()
        scheduler, future, cancel = submitted(runner)
        runner.answer("a")
        cancel()
        assert future.cancelled()
        assert sorted(runner.cancelled) == ["b", "c"]
        runner.answer("b")
        runner.answer("c")
        assert not runner.waiting  # d never starts
        assert scheduler.stats.fail.count == 1 and scheduler.stats.success.count == 0

    asyncio.run(main())


def test_a_step_that_needs_a_task_runs_in_one() -> None:
    async def main() -> None:
        runner = Runner()
        runner.via_task = {"b", "c"}
        scheduler, future, _ = submitted(runner)
        runner.answer("a")
        await settle()  # b and c answer from their tasks
        runner.answer("d")
        assert (await future).outputs[0].data == b"d" * 4

    asyncio.run(main())


def test_a_refused_step_fails_the_request_naming_it() -> None:
    async def main() -> None:
        runner = Runner()
        runner.refused = {"c"}
        scheduler, future, _ = submitted(runner)
        runner.answer("a")
        with pytest.raises(InvalidArgumentError, match="in ensemble 'e', .*'c'.*unexpected shape"):
            await future
        assert runner.cancelled == ["b"]

    asyncio.run(main())


def test_a_step_without_its_output_fails_the_request() -> None:
    async def main() -> None:
        runner = Runner()
        scheduler, future, _ = submitted(runner)
        runner.answer("a", InferenceResponse("a", "1", []))
        with pytest.raises(InternalError, match="did not return output 'Y'"):
            await future

    asyncio.run(main())


def test_step_requests_of_one_layout_share_a_signature() -> None:
    """So that each step's model checks them against its config once."""

    async def main() -> None:
        runner = Runner()
        scheduler = diamond(runner)
        signatures = []
        for _ in range(2):
            scheduler.submit(InferenceRequest("e", "", [X]), 1)
            signatures.append(runner.waiting["a"][0].signature)
            runner.answer("a")
            runner.answer("b")
            runner.answer("c")
            runner.answer("d")
        assert signatures[0] is not None and signatures[0] == signatures[1]
        other = Tensor("X", "FP32", (2, 4), bytes(32))
        scheduler.submit(InferenceRequest("e", "", [other]), 2)
        assert runner.waiting["a"][0].signature != signatures[0]

    asyncio.run(main())
