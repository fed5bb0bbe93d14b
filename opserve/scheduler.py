"""Scheduling a model version's requests onto its instances (worker processes).

A request travels whole (id, parameters, requested outputs, tensors) to a worker. Without
batching it goes straight to an instance with room, or waits in a bounded queue (full:
UNAVAILABLE at once), where a request whose client went away is dropped before it runs. With
`dynamic_batching`, queued requests with the same input shapes travel together as one batch (a
list of requests) up to `max_batch_size` (or the largest preferred size); a batch that fills a
preferred size goes at once, otherwise the first request waits at most
`max_queue_delay_microseconds` for company. The queue honours Triton's priority levels and queue
policies (`queues.RequestQueue`). Framework backends merge a batch inside the worker; Python
models get the list as it is.

A decoupled model answers each request with any number of responses, the last one flagged final;
`stream` yields them as they come. `infer` is for models that answer exactly once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from opserve.errors import CancelledError, InternalError, OpserveError, UnavailableError
from opserve.inference import Delivery, InferenceRequest, InferenceResponse
from opserve.memo import remember
from opserve.proto import ModelConfig
from opserve.queues import RequestQueue
from opserve.stats import VersionStats
from opserve.workers.process import Instance, Timings

log = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE_SIZE = 1024
KNOWN_KEYS = 256  # batch keys remembered by request signature (the oldest forgotten first)


@dataclass(slots=True, eq=False)
class _Pending:
    """One request from its arrival until its final response (a `Submission` for a worker)."""

    request: InferenceRequest
    batch_size: int
    arrival_ns: int
    key: tuple[object, ...]
    future: asyncio.Future[InferenceResponse] | None  # the one answer (not decoupled)
    stream: asyncio.Queue[tuple[Delivery, bool]] | None  # decoupled: every answer
    cancelled: bool = False
    failed: bool = False
    finished_ns: int = 0  # when its final response came
    timings: Timings | None = None  # of the execution that served it, once it returned
    execution: tuple[Instance, int, int] | None = None  # worker, execution id, index
    returned: bool = False  # the execution's `execute` returned
    counted: bool = False  # in the statistics
    timer: asyncio.TimerHandle | None = None  # the request's timeout, if it has one
    level: int = 0  # its priority level in the queue (dynamic batching)
    queue_timer: asyncio.TimerHandle | None = None  # its queue policy's timeout, while queued
    waiter: asyncio.Future[Instance] | None = None  # while it waits for an instance
    on_finish: Callable[[_Pending], None] | None = field(default=None, repr=False)

    def deliver(self, item: Delivery, final: bool) -> None:
        if isinstance(item, OpserveError):
            self.failed = True
        if self.stream is not None:
            self.stream.put_nowait((item, final))
        elif self.future is not None and not self.future.done():
            if isinstance(item, OpserveError):
                self.future.set_exception(item)
            elif item is None:
                self.failed = True
                self.future.set_exception(
                    InternalError(f"model '{self.request.model_name}' sent no response")
                )
            else:
                self.future.set_result(item)
        if final and not self.finished_ns:
            self.finished_ns = time.monotonic_ns()
            if self.timer is not None:
                self.timer.cancel()
            if self.on_finish is not None:
                self.on_finish(self)

    @property
    def waiting(self) -> bool:
        """Still wanted: not cancelled (by us, or by its awaiting task going away), not answered
        (nor timed out), its client still there (one that left is answered CANCELLED here)."""
        if self.cancelled or self.finished_ns:
            return False
        gone = self.request.client_gone
        if gone is not None and gone():
            self.deliver(CancelledError("the client went away before the request ran"), True)
            return False
        return self.future is None or not self.future.done()

    def cancel(self) -> None:
        """The client went away: drop it if queued, tell the model if it runs."""
        self.cancelled = True
        if self.future is not None and not self.future.done():
            self.future.cancel()
        if self.execution is not None:
            worker, execution, index = self.execution
            worker.cancel(execution, index)


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    """Set a future's result unless it is done (cancelled, say) already."""
    if not future.done():
        future.set_result(value)


def batch_key(request: InferenceRequest) -> tuple[object, ...]:
    """Requests with equal keys can share a batch: same inputs, same shapes past dimension 0,
    same requested outputs."""
    inputs = tuple(sorted((t.name, t.datatype, t.shape[1:]) for t in request.inputs))
    outputs = tuple(request.requested_outputs) if request.requested_outputs is not None else None
    return (inputs, outputs)


class Scheduler:
    """The requests of one model version, onto that version's instances."""

    pending_class: type[_Pending] = _Pending  # a subclass may follow its requests further

    def __init__(
        self, label: str, config: ModelConfig, stats: VersionStats, decoupled: bool = False
    ) -> None:
        self.label = label
        self.stats = stats
        self.decoupled = decoupled
        self.instances: list[Instance] = []
        self.batching = config.HasField("dynamic_batching") and config.max_batch_size > 0
        self.max_batch_size = max(config.max_batch_size, 1)
        policy = config.dynamic_batching
        preferred = [p for p in policy.preferred_batch_size if 0 < p <= self.max_batch_size]
        self.preferred = sorted(preferred)
        self.target = max(preferred) if preferred else self.max_batch_size
        # whether a dispatch must count what is ready: a preferred size below the target (or a
        # delay) can make it send fewer than are queued, or wait; else it sends up to the target
        # (Triton writes the preferred size `max_batch_size` into every config without one)
        self._counts_ready = any(p < self.target for p in preferred)
        self.delay_ns = policy.max_queue_delay_microseconds * 1000
        # the queue policies bound each priority level; this bounds the whole queue
        self.max_queue_size = DEFAULT_MAX_QUEUE_SIZE
        # executions an instance holds at once: a few keep it busy while answers travel back (and
        # cost no hand-over per request); one lets a batch grow while the instance is busy
        self.depth = 1 if self.batching else 4
        self._busy: dict[Instance, int] = {}
        self._keys: dict[object, tuple[object, ...]] = {}  # batch keys by request signature
        # batching: requests waiting to be batched, in the order they are to be served
        self._queue: RequestQueue[_Pending] = (
            RequestQueue.for_config(config) if self.batching else RequestQueue()
        )
        # no batching: requests waiting for an instance with room
        self._waiters: deque[asyncio.Future[Instance]] = deque()
        self._wakeup = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        # batching: a dispatch is due (called soon), and the timer of a batch's delay
        self._dispatch_due = False
        self._delay_timer: asyncio.TimerHandle | None = None

    # instances ---------------------------------------------------------------------------------
    def add_instance(self, worker: Instance) -> None:
        self.instances.append(worker)
        self._busy[worker] = 0
        self._poke()
        self._wake_waiters()

    def remove_instance(self, worker: Instance) -> None:
        if worker in self._busy:
            self.instances.remove(worker)
            del self._busy[worker]

    def _free_instance(self) -> Instance | None:
        best = None
        for worker in self.instances:
            load = self._busy[worker]
            if load < self.depth and worker.alive and (best is None or load < self._busy[best]):
                best = worker
        return best

    # requests ----------------------------------------------------------------------------------
    def _pending(self, request: InferenceRequest, batch_size: int) -> _Pending:
        loop = asyncio.get_running_loop()
        pending = self.pending_class(
            request,
            batch_size,
            time.monotonic_ns(),
            self._batch_key(request) if self.batching else (),
            None if self.decoupled else loop.create_future(),
            asyncio.Queue() if self.decoupled else None,
        )
        pending.on_finish = self._account
        if request.timeout_us:
            pending.timer = loop.call_later(request.timeout_us / 1e6, self._expire, pending)
        return pending

    def _batch_key(self, request: InferenceRequest) -> tuple[object, ...]:
        """`batch_key`, kept per request signature (`InferenceRequest.signature`): requests of
        one signature share their key."""
        signature = request.signature
        if signature is None:
            return batch_key(request)
        key = self._keys.get(signature)
        if key is None:
            key = batch_key(request)
            remember(self._keys, signature, key, KNOWN_KEYS)
        return key

    def _expire(self, pending: _Pending) -> None:
        """A request's timeout passed: it fails. If its `execute` has not returned by then, the
        instance is presumed hung (Python code cannot be interrupted): its worker is stopped and
        replaced, like a crashed one."""
        if pending.finished_ns:
            return
        if self.batching and pending.execution is None:
            policy = self._queue.policies.get(pending.level)
            if policy is not None and policy.delay and policy.allow_timeout_override:
                return  # Triton: its queue policy delays it instead (`_queue_timeout`)
        error = UnavailableError("Request timeout expired")
        pending.deliver(error, True)
        if pending.waiter is not None and not pending.waiter.done():
            pending.waiter.set_exception(error)  # out of the line for an instance
        if pending.execution is not None and not pending.returned:
            pending.execution[0].presume_hung(
                UnavailableError(
                    f"{self.label}: a request's timeout expired while its execute call had not "
                    "returned; the instance is presumed hung, its worker process was killed and "
                    "is being replaced"
                )
            )

    def submit(
        self,
        request: InferenceRequest,
        batch_size: int,
        on_wait: Callable[[], None] | None = None,
    ) -> _Pending | None:
        """Start a request of a model that answers once, without a task of its own: its
        `_Pending`, whose future resolves with the response. None, with nothing started, when
        there is no batching and every instance is busy (`infer` then waits in line for one).
        `on_wait` is called if the request has to wait in the queue."""
        if not self.batching and (self._waiters or self._free_instance() is None):
            return None
        pending = self._pending(request, batch_size)
        if self.batching:
            instance = self._idle_instance()
            if instance is None:
                try:
                    self._enqueue(pending, on_wait)
                except OpserveError:
                    if pending.timer is not None:
                        pending.timer.cancel()
                    raise
                return pending
            # an idle instance and nothing to wait for: a batch of one, without the
            # dispatcher's hops
        else:
            instance = self._free_instance()
        assert instance is not None
        self._busy[instance] += 1
        self._start(instance, [pending])
        return pending

    async def infer(
        self,
        request: InferenceRequest,
        batch_size: int,
        on_wait: Callable[[], None] | None = None,
    ) -> InferenceResponse:
        """The one response of a model that is not decoupled; `on_wait` is called if the
        request has to wait for an instance."""
        pending = self.submit(request, batch_size, on_wait)
        if pending is None:  # no batching, every instance busy: in line for one
            pending = self._pending(request, batch_size)
            try:
                instance = await self._acquire(pending, on_wait)
            except asyncio.CancelledError:
                pending.cancel()
                raise
            self._start(instance, [pending])
        assert pending.future is not None
        try:
            return await pending.future  # cancelled when its client goes away
        except asyncio.CancelledError:  # the client went away: a running model is told
            pending.cancel()
            raise

    async def stream(
        self, request: InferenceRequest, batch_size: int
    ) -> AsyncIterator[tuple[Delivery, bool]]:
        """Every answer of a decoupled model to `request`, the last one final. Closing the
        iterator early (the client went away) drops the request or tells the model."""
        pending = self._pending(request, batch_size)
        assert pending.stream is not None
        try:
            if self.batching:
                self._enqueue(pending, None)
            else:
                self._background(self._acquire_and_run(pending))
            while True:
                item, final = await pending.stream.get()
                yield item, final
                if final:
                    return
        finally:
            if not pending.finished_ns:
                pending.cancel()

    def _idle_instance(self) -> Instance | None:
        """With batching: an instance free now, when nothing queued and no delay could add
        company to a request (it would run alone at once anyway)."""
        if self._queue or self.delay_ns:
            return None
        return self._free_instance()

    def _enqueue(self, pending: _Pending, on_wait: Callable[[], None] | None) -> None:
        if len(self._queue) >= self.max_queue_size:
            self._queue_full()
        pending.level = self._queue.level(pending.request.priority)
        try:
            policy = self._queue.push(pending, pending.level)
        except UnavailableError:
            self.stats.record_failure(0)
            raise
        timeout_us = policy.timeout_us(pending.request.timeout_us)
        if timeout_us:
            pending.queue_timer = asyncio.get_running_loop().call_later(
                timeout_us / 1e6, self._queue_timeout, pending
            )
        if on_wait is not None and pending.request.client_gone is None:
            on_wait()
        self._poke()

    def _queue_full(self) -> None:
        self.stats.record_failure(0)
        raise UnavailableError(
            f"Exceeds maximum queue size: {self.label} holds {self.max_queue_size} queued "
            "requests; try again later"
        )

    def _queue_timeout(self, pending: _Pending) -> None:
        """Its level's queue timeout passed while it waited: rejected, or delayed behind the
        requests of its level still on time."""
        pending.queue_timer = None
        if self._queue.expire(pending, pending.level) and not pending.finished_ns:
            pending.deliver(UnavailableError("Request timeout expired"), True)
        self._poke()

    async def _acquire_and_run(self, pending: _Pending) -> None:
        try:
            instance = await self._acquire(pending, None)
        except OpserveError as error:  # a timeout (delivered already), an unload, a full queue
            if not pending.finished_ns:
                pending.deliver(error, True)
            return
        if pending.waiting:
            await self._run(instance, [pending])
        else:  # its client went away meanwhile
            self._release(instance)

    async def _acquire(self, pending: _Pending, on_wait: Callable[[], None] | None) -> Instance:
        """Without batching: an instance with room at once, or after waiting in line for one
        (no dispatcher task, no hop)."""
        instance = self._free_instance() if not self._waiters else None
        if instance is not None:
            self._busy[instance] += 1
            return instance
        if len(self._waiters) >= self.max_queue_size:
            self._queue_full()
        waiter: asyncio.Future[Instance] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        pending.waiter = waiter
        if on_wait is not None:
            on_wait()
        try:
            return await waiter  # an instance handed over by a finishing request
        except asyncio.CancelledError:  # the client went away while waiting: never runs
            if waiter.done() and not waiter.cancelled():
                self._release(waiter.result())
            raise

    def _release(self, instance: Instance) -> None:
        """An instance has room again: hand it to the first request still waiting."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                if instance.alive and instance in self._busy:
                    waiter.set_result(instance)  # the slot passes on; the count stays
                    return
                self._waiters.appendleft(waiter)
                break
        if instance in self._busy:
            self._busy[instance] -= 1
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        """Give free instances (a new or replaced one) to waiting requests."""
        while self._waiters:
            instance = self._free_instance()
            if instance is None:
                return
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._busy[instance] += 1
                waiter.set_result(instance)

    def _drop_cancelled(self) -> None:
        self._queue.drop_leading(lambda pending: not pending.waiting)

    async def _wait(self, timeout_ns: int | None = None) -> bool:
        """Sleep until something changes; False when `timeout_ns` passed first."""
        self._wakeup.clear()
        if timeout_ns is None:
            await self._wakeup.wait()
            return True
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout_ns / 1e9)
            return True
        except asyncio.TimeoutError:
            return False

    def _poke(self, at_once: bool = False) -> None:
        """Something changed (a request queued, an instance freed or added, a delay ended):
        with batching, dispatch soon, once the requests arriving in this turn of the event loop
        are queued too, so that they can share a batch (`at_once`: now)."""
        self._wakeup.set()
        if at_once and self.batching:
            self._dispatch_now()
        elif self.batching and self._queue and not self._dispatch_due:
            self._dispatch_due = True
            asyncio.get_running_loop().call_soon(self._dispatch_now)

    def _dispatch_now(self) -> None:
        """With batching: send batches while an instance is free and one is worth sending. As
        Triton's dynamic batcher: the largest preferred size (or `max_batch_size`) at once, or
        any preferred size the queued requests can fill, else whatever is queued once the delay
        (counted from the first request's arrival) has passed; a timer wakes it then."""
        self._dispatch_due = False
        while True:
            self._drop_cancelled()
            if not self._queue:
                return
            instance = self._free_instance()
            if instance is None:
                return  # poked again when an execution returns or an instance is added
            size = self.target
            # only smaller preferred sizes or a delay can make waiting (or sending fewer) worth
            # it; without them what is queued goes, up to the target, without counting first
            if self._counts_ready or self.delay_ns:
                first = self._queue.first()
                sendable = self._sendable(self._ready_size(first.key))
                if sendable:
                    size = sendable
                else:
                    remaining_ns = first.arrival_ns + self.delay_ns - time.monotonic_ns()
                    if remaining_ns > 0:
                        self._wake_after(remaining_ns)
                        return
            batch = self._take(size)
            self._busy[instance] += 1
            self._start(instance, batch)

    def _wake_after(self, delay_ns: int) -> None:
        loop = asyncio.get_running_loop()
        when = loop.time() + delay_ns / 1e9
        timer = self._delay_timer
        if timer is not None and not timer.cancelled() and timer.when() <= when:
            return
        if timer is not None:
            timer.cancel()
        self._delay_timer = loop.call_at(when, self._delay_ended)

    def _delay_ended(self) -> None:
        self._delay_timer = None
        self._poke()

    def _start(self, instance: Instance, batch: list[_Pending]) -> None:
        """Send one batch to one instance (busy already counted); what follows happens in
        `_executed`, called by the instance when the execution returns, without a task or a
        future of its own."""
        try:
            execution = instance.execute(batch, functools.partial(self._executed, instance, batch))
        except OpserveError as error:
            self._executed(instance, batch, error)
            return
        for index, pending in enumerate(batch):
            pending.execution = (instance, execution, index)

    def _executed(
        self, instance: Instance, batch: list[_Pending], outcome: Timings | OpserveError
    ) -> None:
        """An execution started by `_start` returned (or failed, or failed to start): its
        statistics at once, before any of its answers' waiters resumes; the instance is free
        again in the loop's next turn, after the requests arriving in this one are queued (so
        that they share the next batch, rather than the first of them running alone)."""
        asyncio.get_running_loop().call_soon(self._room_again, instance, True)
        self._conclude(batch, outcome)

    def _conclude(self, batch: list[_Pending], outcome: Timings | OpserveError) -> None:
        """An execution's end for its requests: its statistics, or its error for each request
        still open."""
        if isinstance(outcome, OpserveError):
            for pending in batch:
                if not pending.finished_ns:
                    pending.deliver(outcome, True)
            return
        for pending in batch:
            pending.returned = True
        self._record(batch, outcome)

    def _background(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    def _sendable(self, ready: int) -> int:
        """The batch size to send now with `ready` queued (0: better to wait)."""
        if ready >= self.target:
            return self.target
        return max((p for p in self.preferred if p <= ready), default=0)

    def _ready_size(self, key: tuple[object, ...]) -> int:
        return sum(p.batch_size for p in self._queue if p.key == key and p.waiting)

    def _take(self, limit: int) -> list[_Pending]:
        """The next batch, in serving order: the first waiting request and those after it with
        its key, as many as fit in `limit`."""
        key: tuple[object, ...] | None = None
        size, limit = 0, min(limit, self.max_batch_size)

        def chosen(pending: _Pending) -> bool:
            nonlocal key, size
            if not pending.waiting:
                return False
            if key is None or (pending.key == key and size + pending.batch_size <= limit):
                key = pending.key
                size += pending.batch_size
                return True
            return False

        batch = self._queue.take(chosen)
        for pending in batch:
            if pending.queue_timer is not None:
                pending.queue_timer.cancel()
        return batch

    async def _run(self, instance: Instance, batch: list[_Pending]) -> None:
        """Execute one batch on one instance; its responses reach each request as they come."""
        outcome: Timings | OpserveError
        try:
            returned: asyncio.Future[Timings | OpserveError] = (
                asyncio.get_running_loop().create_future()
            )
            execution = instance.execute(batch, functools.partial(_resolve, returned))
            for index, pending in enumerate(batch):
                pending.execution = (instance, execution, index)
            outcome = await returned
        except OpserveError as error:
            outcome = error
        finally:
            self._room_again(instance)
        self._conclude(batch, outcome)

    def _room_again(self, instance: Instance, at_once: bool = False) -> None:
        """An execution of `instance` ended: with batching, a dispatch may send the next batch
        (`at_once`: now, before the ended execution's answers are written, so the instance works
        while they are); without, the instance passes to the first request waiting for one."""
        if self.batching:
            if instance in self._busy:
                self._busy[instance] -= 1
            self._poke(at_once)
        else:
            self._release(instance)

    def _record(self, batch: list[_Pending], timings: Timings) -> None:
        """An execution's statistics, and those of its requests that have finished."""
        self.stats.record_execution(
            sum(p.batch_size for p in batch), timings.input_ns, timings.infer_ns, timings.output_ns
        )
        for pending in batch:
            pending.timings = timings
            if pending.finished_ns:
                self._account(pending)

    async def warm_up(self, instance: Instance, requests: list[InferenceRequest]) -> None:
        """Execute `requests` as one batch on `instance` before it serves (counted in the
        statistics like any execution); raises the first error a request got. As in Triton the
        requests go straight to the instance: no sequence or queue rules apply to them."""
        pendings = [Scheduler._pending(self, request, 1) for request in requests]
        await self._run(instance, pendings)
        for pending in pendings:
            if pending.future is not None:
                await pending.future
                continue
            assert pending.stream is not None
            while True:  # a decoupled model: every answer, up to the final flag
                item, final = await pending.stream.get()
                if isinstance(item, OpserveError):
                    raise item
                if final:
                    break

    def _account(self, pending: _Pending) -> None:
        """Statistics for a finished request (once its execution's timings are known)."""
        if pending.counted:
            return
        if pending.failed:
            pending.counted = True
            self.stats.record_failure(pending.finished_ns - pending.arrival_ns)
            return
        timings = pending.timings
        if timings is None:
            return  # counted when its execution returns
        pending.counted = True
        trace = pending.request.trace
        if trace is not None:
            trace.compute(
                pending.arrival_ns,
                timings.started_ns,
                timings.input_ns,
                timings.infer_ns,
                timings.output_ns,
            )
        self.stats.record_success(
            pending.batch_size,
            pending.finished_ns - pending.arrival_ns,
            max(timings.started_ns - pending.arrival_ns, 0),
            timings.input_ns,
            timings.infer_ns,
            timings.output_ns,
        )
        sink = pending.request.stats_sink
        if sink is not None:
            sink(timings.input_ns, timings.infer_ns, timings.output_ns)

    async def close(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.cancel()
        if self._delay_timer is not None:
            self._delay_timer.cancel()
        error = UnavailableError(f"{self.label} is being unloaded")
        for pending in self._queue.clear():
            if pending.waiting:
                pending.deliver(error, True)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(error)
        self._waiters.clear()
