"""Running an ensemble's requests: each step is a request to its model through the dataplane.

A step starts as soon as every tensor it consumes exists, so independent steps run at once.
Tensors pass between steps as the protocol-free `Tensor` objects the dataplane returns (no
frontend codec in between); each step's request goes through its model's own validation and
scheduler, so each step model keeps its own statistics.

An ensemble whose steps all answer once (the common case: pre-processing, a network,
post-processing) runs from callbacks, as a single model's request does (`_Execution`): each step
is started through the dataplane's `submit`, and its answer starts the steps it completes, with
no task and no coroutine per request or per step (a step that needs a task of its own, such as a
traced one, gets one).

A decoupled step may answer any number of times: each response starts the steps after it
(their own flow, with that response's tensors), and every flow that completes the ensemble's
outputs is one response of the ensemble. The rules checked at load (`ensemble.check_steps`)
guarantee that a step never mixes tensors of two different decoupled responses. Such an
ensemble runs as coroutines (`_flow`), one flow per decoupled response.

Statistics as Triton keeps them for an ensemble: a request counts once (success or failure,
end to end); its compute times are the sums of its steps' compute times, and each successful
request is one execution of its batch size.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from opserve.ensemble import EnsembleGraph, Step, downstream
from opserve.errors import (
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    OpserveError,
    UnavailableError,
)
from opserve.inference import Delivery, InferenceRequest, InferenceResponse, Tensor
from opserve.stats import VersionStats

StepOutcome = InferenceResponse | BaseException
Cancel = Callable[[], object]


class StepRunner(Protocol):
    """What runs one step's request on its model: the dataplane."""

    async def infer(self, request: InferenceRequest) -> InferenceResponse: ...

    def submit(
        self, request: InferenceRequest, done: Callable[[StepOutcome], None]
    ) -> Cancel | None: ...

    def stream(
        self, request: InferenceRequest
    ) -> AsyncIterator[tuple[InferenceResponse | OpserveError | None, bool]]: ...


@dataclass(slots=True)
class _Run:
    """One request to the ensemble, across all its flows."""

    request: InferenceRequest
    wanted: tuple[str, ...]  # the ensemble outputs to answer with
    emit: Callable[[dict[str, Tensor], bool], None]  # the outputs; whether nothing can follow
    # steps running, and decoupled responses waiting for (or running) the steps after them:
    # an answer given when this is 0 is the last one (Triton flags it final)
    inflight: int = 0
    final_sent: bool = False
    deadline_ns: int = 0  # from the request's `timeout`: each step gets what is left of it
    input_ns: int = 0  # the steps' compute times, summed
    infer_ns: int = 0
    output_ns: int = 0

    def __post_init__(self) -> None:
        if self.request.timeout_us:  # counted from the request's start in the ensemble
            self.deadline_ns = time.monotonic_ns() + self.request.timeout_us * 1000

    def add_compute(self, input_ns: int, infer_ns: int, output_ns: int) -> None:
        self.input_ns += input_ns
        self.infer_ns += infer_ns
        self.output_ns += output_ns


class EnsembleScheduler:
    """The requests of one ensemble version; the same surface as `scheduler.Scheduler`."""

    def __init__(
        self,
        label: str,
        graph: EnsembleGraph,
        stats: VersionStats,
        decoupled_steps: frozenset[int],
        runner: StepRunner,
    ) -> None:
        self.label = label
        self.graph = graph
        self.stats = stats
        self.decoupled_steps = decoupled_steps
        self.decoupled = bool(decoupled_steps)
        self.runner = runner
        self._all_steps = frozenset(s.index for s in graph.steps)
        # what each step reads (its model's input, the ensemble tensor) and asks for
        self._reads = [tuple(s.input_map.items()) for s in graph.steps]
        self._needs = [frozenset(s.input_map.values()) for s in graph.steps]  # tensors it reads
        self._asks = [list(s.output_map) for s in graph.steps]
        self._signature_key = object()  # this ensemble's part of its step requests' signatures
        self._after = {i: downstream(graph, graph.steps[i]) for i in decoupled_steps}
        self._running: set[asyncio.Future[None]] = set()

    # the scheduler's surface -------------------------------------------------------------------
    def submit(
        self, request: InferenceRequest, batch_size: int
    ) -> tuple[asyncio.Future[InferenceResponse], Cancel]:
        """Start a request of an ensemble whose steps all answer once, without a task: the
        future resolves with its response (or its error), and the function returned cancels it
        (its client went away: the steps running are cancelled, those not started never
        start)."""
        assert not self.decoupled, "a decoupled ensemble streams its responses"
        execution = _Execution(self, request, batch_size)
        execution.advance()
        return execution.future, execution.cancel

    async def infer(
        self,
        request: InferenceRequest,
        batch_size: int,
        on_wait: Callable[[], None] | None = None,
    ) -> InferenceResponse:
        """The one response of an ensemble whose steps all answer once."""
        future, cancel = self.submit(request, batch_size)
        try:
            return await future
        except asyncio.CancelledError:  # the awaiting task was cancelled (its client went away)
            cancel()
            raise

    async def stream(
        self, request: InferenceRequest, batch_size: int
    ) -> AsyncIterator[tuple[Delivery, bool]]:
        """Every response of an ensemble with a decoupled step; as in Triton, the one given when
        nothing else is in flight is flagged final (else the final flag comes alone)."""
        queue: asyncio.Queue[tuple[Delivery, bool]] = asyncio.Queue()

        def emit(tensors: dict[str, Tensor], last: bool) -> None:
            run.final_sent = last
            queue.put_nowait((self._response(run, tensors), last))

        run = _Run(request, self._wanted(request), emit)
        task = asyncio.ensure_future(self._stream_run(run, batch_size, queue))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        try:
            while True:
                item, final = await queue.get()
                yield item, final
                if final:
                    return
        finally:
            if not task.done() and not run.final_sent:  # the client went away
                task.cancel()

    async def close(self) -> None:
        """Nothing to stop: an ensemble holds no worker; requests in flight finish."""

    # running -----------------------------------------------------------------------------------
    async def _stream_run(
        self, run: _Run, batch_size: int, queue: asyncio.Queue[tuple[Delivery, bool]]
    ) -> None:
        arrival = time.monotonic_ns()
        try:
            await self._execute(run)
        except OpserveError as error:
            self.stats.record_failure(time.monotonic_ns() - arrival)
            queue.put_nowait((error, True))
            return
        except asyncio.CancelledError:
            self.stats.record_failure(time.monotonic_ns() - arrival)
            raise
        self._record_success(run, batch_size, arrival)
        if not run.final_sent:
            queue.put_nowait((None, True))

    async def _execute(self, run: _Run) -> None:
        """The whole graph; with the request's `timeout`, each step request gets the time left
        of it (`_Run.deadline_ns`), so a step that runs late (or hangs) is failed by its own
        scheduler."""
        await self._flow(run, {t.name: t for t in run.request.inputs}, self._all_steps)

    async def _flow(
        self, run: _Run, tensors: dict[str, Tensor], steps: frozenset[int], held: int = 0
    ) -> None:
        """Run `steps` as their inputs appear in `tensors`; answer when the outputs exist.
        `held`: what this flow counts in flight (a decoupled response), until its steps end."""
        remaining = set(steps)
        running: dict[asyncio.Future[None], Step] = {}
        try:
            while True:
                ready = self._take_ready(remaining, tensors)
                if len(ready) == 1 and not running:  # a chain: no task needed
                    await self._step(run, ready[0], tensors)
                    continue
                for step in ready:
                    running[asyncio.ensure_future(self._step(run, step, tensors))] = step
                if not running:
                    break
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    del running[task]
                    task.result()  # a failed step fails the request
        finally:
            for task in running:
                task.cancel()
        run.inflight -= held
        if all(name in tensors for name in run.wanted):
            run.emit(tensors, run.inflight == 0)

    async def _step(self, run: _Run, step: Step, tensors: dict[str, Tensor]) -> None:
        request = self._step_request(run, step, tensors)
        run.inflight += 1
        if step.index not in self.decoupled_steps:
            try:
                response = await self.runner.infer(request)
            except OpserveError as exc:
                raise self._step_error(step, exc) from None
            finally:
                run.inflight -= 1
            tensors.update(self._step_outputs(step, response))
            return
        # a decoupled step: its responses are read as they come; each continues, in order, in a
        # flow of its own through the steps after it
        responses: asyncio.Queue[InferenceResponse | OpserveError | None] = asyncio.Queue()
        reader = asyncio.ensure_future(self._read(run, step, request, responses))
        try:
            while (item := await responses.get()) is not None:
                if isinstance(item, OpserveError):
                    raise item
                branch = dict(tensors)
                branch.update(self._step_outputs(step, item))
                await self._flow(run, branch, self._after[step.index], held=1)
        finally:
            reader.cancel()

    async def _read(
        self,
        run: _Run,
        step: Step,
        request: InferenceRequest,
        responses: asyncio.Queue[InferenceResponse | OpserveError | None],
    ) -> None:
        """A decoupled step's responses into `responses` (each counted in flight), then None;
        the step stops counting in flight once its final flag came."""
        stream = self.runner.stream(request)
        try:
            while True:
                try:
                    item, final = await stream.__anext__()
                except StopAsyncIteration:
                    break
                except OpserveError as exc:
                    item, final = exc, True
                if isinstance(item, OpserveError):
                    responses.put_nowait(self._step_error(step, item))
                    break
                if item is not None:
                    run.inflight += 1
                    responses.put_nowait(item)
                if final:
                    break
        finally:
            run.inflight -= 1
            responses.put_nowait(None)
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()

    def _take_ready(self, remaining: set[int], tensors: dict[str, Tensor]) -> list[Step]:
        """The steps of `remaining` whose inputs all exist, in order; taken out of it."""
        steps, needs, present = self.graph.steps, self._needs, tensors.keys()
        ready = [steps[i] for i in sorted(remaining) if needs[i] <= present]
        for step in ready:
            remaining.discard(step.index)
        return ready

    # requests and responses --------------------------------------------------------------------
    def _wanted(self, request: InferenceRequest) -> tuple[str, ...]:
        if request.requested_outputs is None:
            return self.graph.outputs
        return tuple(request.requested_outputs)

    def _step_request(self, run: _Run, step: Step, tensors: dict[str, Tensor]) -> InferenceRequest:
        inputs = []
        for model_input, name in self._reads[step.index]:
            tensor = tensors[name]
            inputs.append(Tensor(model_input, tensor.datatype, tensor.shape, tensor.data))
        original = run.request
        timeout_us = 0
        if run.deadline_ns:
            timeout_us = max((run.deadline_ns - time.monotonic_ns()) // 1000, 1)
        request = InferenceRequest(
            step.model_name,
            step.version,
            inputs,
            list(self._asks[step.index]),
            original.id,
            dict(original.parameters) if original.parameters else {},
            original.correlation_id,  # a sequence model as a step sees it
            original.flags,
            timeout_us=timeout_us,
            client_gone=original.client_gone,
            stats_sink=run.add_compute,
        )
        if not original.parameters:
            # the step's requests of one input layout are checked against its model's config
            # once, like a frontend's requests of one header (`InferenceRequest.signature`)
            layout = tuple((t.name, t.datatype, tuple(t.shape), len(t.data)) for t in inputs)
            request.signature = (self._signature_key, step.index, layout)
        return request

    def _step_outputs(self, step: Step, response: InferenceResponse) -> dict[str, Tensor]:
        returned = {t.name: t for t in response.outputs}
        outputs = {}
        for model_output, name in step.output_map.items():
            tensor = returned.get(model_output)
            if tensor is None:
                raise InternalError(
                    f"in ensemble '{self.graph.name}', {step.label} did not return output "
                    f"'{model_output}'"
                )
            outputs[name] = Tensor(name, tensor.datatype, tensor.shape, tensor.data)
        return outputs

    def _response(self, run: _Run, tensors: dict[str, Tensor]) -> InferenceResponse:
        return InferenceResponse(self.graph.name, "", [tensors[name] for name in run.wanted])

    def _deadlock(self) -> OpserveError:
        """Triton's words for a graph that ends without all of its outputs."""
        return InvalidArgumentError(
            f"in ensemble '{self.graph.name}', unexpected deadlock, at least one output is not "
            "set while no more ensemble steps can be made"
        )

    def _step_error(self, step: Step, error: OpserveError) -> OpserveError:
        """The step's error, naming the ensemble and the step; a step model that is not there
        makes the ensemble UNAVAILABLE."""
        message = f"in ensemble '{self.graph.name}', {step.label}: {error.message}"
        if isinstance(error, NotFoundError):
            return UnavailableError(message)
        return type(error)(message)

    def _record_success(self, run: _Run, batch_size: int, arrival: int) -> None:
        now = time.monotonic_ns()
        self.stats.record_success(
            batch_size, now - arrival, 0, run.input_ns, run.infer_ns, run.output_ns
        )
        self.stats.record_execution(batch_size, run.input_ns, run.infer_ns, run.output_ns)
        sink = run.request.stats_sink
        if sink is not None:  # a step of an outer ensemble
            sink(run.input_ns, run.infer_ns, run.output_ns)


class _Execution:
    """One request through an ensemble whose steps all answer once, driven by the steps'
    answers: a step starts as soon as its inputs exist (through the dataplane's `submit`, or a
    task of its own where the step needs one), and the request is answered once no step runs
    and none can start. The first step that fails fails the request and cancels the others."""

    __slots__ = (
        "ensemble",
        "run",
        "batch_size",
        "arrival_ns",
        "future",
        "tensors",
        "remaining",
        "running",
        "over",
    )

    def __init__(self, ensemble: EnsembleScheduler, request: InferenceRequest, batch_size: int):
        self.ensemble = ensemble
        self.run = _Run(request, ensemble._wanted(request), _no_emit)
        self.batch_size = batch_size
        self.arrival_ns = time.monotonic_ns()
        self.future: asyncio.Future[InferenceResponse] = asyncio.get_running_loop().create_future()
        self.tensors = {t.name: t for t in request.inputs}
        self.remaining = set(ensemble._all_steps)
        self.running: dict[int, Cancel] = {}  # step index -> what cancels it
        self.over = False  # answered, failed or cancelled

    def cancel(self) -> None:
        """The client went away."""
        if not self.over:
            self._end(None)

    def advance(self) -> None:
        """Start the steps whose inputs exist; answer once none runs and none can start."""
        for step in self.ensemble._take_ready(self.remaining, self.tensors):
            self._start(step)
            if self.over:  # the step failed to start
                return
        if not self.running and not self.over:
            if all(name in self.tensors for name in self.run.wanted):
                self._answer()
            else:
                self._end(self.ensemble._deadlock())

    def _start(self, step: Step) -> None:
        ensemble = self.ensemble
        request = ensemble._step_request(self.run, step, self.tensors)

        def done(outcome: StepOutcome) -> None:
            self._step_done(step, outcome)

        self.running[step.index] = _nothing  # until the step says what cancels it
        try:
            cancel = ensemble.runner.submit(request, done)
        except Exception as error:  # refused before it was queued (or a bug: answered too)
            self.running.pop(step.index, None)
            if isinstance(error, OpserveError):
                error = ensemble._step_error(step, error)
            self._end(error)
            return
        if cancel is None:  # the step needs a task of its own
            task = asyncio.ensure_future(ensemble.runner.infer(request))
            task.add_done_callback(lambda t: done(_outcome(t)))
            cancel = task.cancel
        if step.index in self.running:
            self.running[step.index] = cancel

    def _step_done(self, step: Step, outcome: StepOutcome) -> None:
        if self.over or self.running.pop(step.index, None) is None:
            return
        ensemble = self.ensemble
        if isinstance(outcome, BaseException):
            if isinstance(outcome, OpserveError):
                outcome = ensemble._step_error(step, outcome)
            self._end(outcome)
            return
        try:
            self.tensors.update(ensemble._step_outputs(step, outcome))
            self.advance()
        except Exception as error:  # a step's outputs missing (or a bug): answered, never lost
            if not self.over:
                self._end(error)

    def _answer(self) -> None:
        ensemble, run = self.ensemble, self.run
        response = ensemble._response(run, self.tensors)
        ensemble._record_success(run, self.batch_size, self.arrival_ns)
        self.over = True
        if not self.future.done():
            self.future.set_result(response)

    def _end(self, error: BaseException | None) -> None:
        """Failed with `error`, or cancelled (None): the steps still running are cancelled."""
        self.over = True
        running, self.running = self.running, {}
        for cancel in running.values():
            cancel()
        self.ensemble.stats.record_failure(time.monotonic_ns() - self.arrival_ns)
        future = self.future
        if future.done():
            return
        if error is None or isinstance(error, asyncio.CancelledError):
            future.cancel()
        else:
            future.set_exception(error)


def _no_emit(tensors: dict[str, Tensor], last: bool) -> None:
    """`_Execution` answers by itself, not through `_Run.emit`."""


def _nothing() -> None:
    pass


def _outcome(task: asyncio.Future[InferenceResponse]) -> StepOutcome:
    if task.cancelled():
        return asyncio.CancelledError()
    error = task.exception()
    return error if error is not None else task.result()
