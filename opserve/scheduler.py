"""Scheduling a model version's requests onto its instances (worker processes).

A request goes straight to an instance with room when nothing is queued; otherwise it waits in a
bounded queue (full: UNAVAILABLE at once), where a request whose client went away is dropped before
it runs. With `dynamic_batching`, queued requests with the same input shapes are merged along the
batch dimension up to `max_batch_size` (or the largest preferred size), executed once and split
back; the first request waits at most `max_queue_delay_microseconds` for company.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from opserve.datatypes import deserialize_bytes, serialize_bytes
from opserve.errors import InternalError, OpserveError, UnavailableError
from opserve.inference import Tensor
from opserve.proto import ModelConfig
from opserve.stats import VersionStats
from opserve.workers.process import Execution, WorkerProcess

log = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE_SIZE = 1024


@dataclass(slots=True)
class _Pending:
    inputs: list[Tensor]
    outputs: list[str]
    batch_size: int
    arrival_ns: int
    key: tuple[object, ...]
    future: asyncio.Future[list[Tensor]]


def batch_key(inputs: list[Tensor], outputs: list[str]) -> tuple[object, ...]:
    """Requests with equal keys can be merged: same inputs, same shapes past the batch dimension."""
    return (tuple(sorted((t.name, t.datatype, t.shape[1:]) for t in inputs)), tuple(outputs))


def merge(requests: list[_Pending]) -> list[Tensor]:
    """Concatenate the requests' inputs along dimension 0 (raw data concatenates in row order)."""
    merged = []
    total = sum(r.batch_size for r in requests)
    for tensor in sorted(requests[0].inputs, key=lambda t: t.name):
        parts = [next(t for t in r.inputs if t.name == tensor.name).data for r in requests]
        merged.append(
            Tensor(tensor.name, tensor.datatype, (total, *tensor.shape[1:]), b"".join(parts))
        )
    return merged


def split(outputs: list[Tensor], sizes: list[int]) -> list[list[Tensor]]:
    """Each request's share of the batched outputs, by its batch size."""
    total = sum(sizes)
    shares: list[list[Tensor]] = [[] for _ in sizes]
    for tensor in outputs:
        if not tensor.shape or tensor.shape[0] != total:
            raise InternalError(
                f"output '{tensor.name}' has shape {list(tensor.shape)}, but the batch holds {total}"
            )
        rest = tensor.shape[1:]
        if tensor.datatype == "BYTES":
            elements = deserialize_bytes(tensor.data)
            per_row = len(elements) // total
            start = 0
            for share, size in zip(shares, sizes, strict=True):
                chunk = elements[start : start + size * per_row]
                share.append(Tensor(tensor.name, "BYTES", (size, *rest), serialize_bytes(chunk)))
                start += size * per_row
        else:
            row = len(tensor.data) // total
            start = 0
            for share, size in zip(shares, sizes, strict=True):
                data = tensor.data[start : start + size * row]
                share.append(Tensor(tensor.name, tensor.datatype, (size, *rest), data))
                start += size * row
    return shares


class Scheduler:
    """The requests of one model version, onto that version's instances."""

    def __init__(self, label: str, config: ModelConfig, stats: VersionStats) -> None:
        self.label = label
        self.stats = stats
        self.instances: list[WorkerProcess] = []
        self.batching = config.HasField("dynamic_batching") and config.max_batch_size > 0
        self.max_batch_size = max(config.max_batch_size, 1)
        policy = config.dynamic_batching
        preferred = [p for p in policy.preferred_batch_size if 0 < p <= self.max_batch_size]
        self.target = max(preferred) if preferred else self.max_batch_size
        self.delay_ns = policy.max_queue_delay_microseconds * 1000
        self.max_queue_size = policy.default_queue_policy.max_queue_size or DEFAULT_MAX_QUEUE_SIZE
        # requests an instance holds at once: a few keep it busy while answers travel back (and
        # cost no hand-over per request); one lets a batch grow while the instance is busy
        self.depth = 1 if self.batching else 4
        self._busy: dict[WorkerProcess, int] = {}
        self._queue: deque[_Pending] = deque()  # batching: requests waiting to be batched
        # no batching: requests waiting for an instance with room
        self._waiters: deque[asyncio.Future[WorkerProcess]] = deque()
        self._wakeup = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    # instances ---------------------------------------------------------------------------------
    def add_instance(self, worker: WorkerProcess) -> None:
        self.instances.append(worker)
        self._busy[worker] = 0
        self._wakeup.set()
        self._wake_waiters()

    def remove_instance(self, worker: WorkerProcess) -> None:
        if worker in self._busy:
            self.instances.remove(worker)
            del self._busy[worker]

    def _free_instance(self) -> WorkerProcess | None:
        best = None
        for worker in self.instances:
            load = self._busy[worker]
            if load < self.depth and worker.alive and (best is None or load < self._busy[best]):
                best = worker
        return best

    # requests ----------------------------------------------------------------------------------
    async def infer(
        self,
        inputs: list[Tensor],
        outputs: list[str],
        batch_size: int,
        on_wait: Callable[[], None] | None = None,
    ) -> list[Tensor]:
        """The request's outputs; `on_wait` is called if it has to wait for an instance."""
        if not self.batching:
            return await self._infer_alone(inputs, outputs, batch_size, on_wait)
        arrival = time.monotonic_ns()
        if len(self._queue) >= self.max_queue_size:
            self.stats.record_failure(0)
            raise UnavailableError(
                f"{self.label}: the request queue is full ({self.max_queue_size} requests); try again later"
            )
        future: asyncio.Future[list[Tensor]] = asyncio.get_running_loop().create_future()
        key = batch_key(inputs, outputs) if self.batching else ()
        self._queue.append(_Pending(inputs, outputs, batch_size, arrival, key, future))
        if on_wait is not None:
            on_wait()
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.ensure_future(self._dispatch())
        self._wakeup.set()
        return await future  # cancelled when the client goes away: the dispatcher skips it

    async def _infer_alone(
        self,
        inputs: list[Tensor],
        outputs: list[str],
        batch_size: int,
        on_wait: Callable[[], None] | None,
    ) -> list[Tensor]:
        """Without batching, a request runs in its own coroutine: on an instance with room at
        once, or after waiting in line for one (no dispatcher task, no hop)."""
        arrival = time.monotonic_ns()
        instance = self._free_instance() if not self._waiters else None
        if instance is not None:
            self._busy[instance] += 1
        else:
            if len(self._waiters) >= self.max_queue_size:
                self.stats.record_failure(0)
                raise UnavailableError(
                    f"{self.label}: the request queue is full ({self.max_queue_size} requests); try again later"
                )
            waiter: asyncio.Future[WorkerProcess] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            if on_wait is not None:
                on_wait()
            try:
                instance = await waiter  # an instance handed over by a finishing request
            except asyncio.CancelledError:  # the client went away while waiting: never runs
                if waiter.done() and not waiter.cancelled():
                    self._release(waiter.result())
                raise
        future: asyncio.Future[list[Tensor]] = asyncio.get_running_loop().create_future()
        await self._run(instance, [_Pending(inputs, outputs, batch_size, arrival, (), future)])
        return future.result()

    def _release(self, instance: WorkerProcess) -> None:
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
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()

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

    async def _dispatch(self) -> None:
        """With batching: wait for an idle instance, then for a batch, then run it."""
        while True:
            self._drop_cancelled()
            if not self._queue:
                return  # started again by the next queued request
            if self._free_instance() is None:
                await self._wait()
                continue
            await self._gather()
            self._drop_cancelled()
            instance = self._free_instance()  # again: the wait may have cost one
            if not self._queue or instance is None:
                continue
            batch = self._take()
            self._busy[instance] += 1
            task = asyncio.ensure_future(self._run(instance, batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _gather(self) -> None:
        """Wait (up to the delay, counted from the first request's arrival) for a full batch."""
        first = self._queue[0]
        deadline = first.arrival_ns + self.delay_ns
        while self._ready_size(first.key) < self.target:
            remaining = deadline - time.monotonic_ns()
            if remaining <= 0 or not await self._wait(remaining):
                return

    def _ready_size(self, key: tuple[object, ...]) -> int:
        return sum(p.batch_size for p in self._queue if p.key == key and not p.future.done())

    def _take(self) -> list[_Pending]:
        first = self._queue.popleft()
        batch, size = [first], first.batch_size
        kept: deque[_Pending] = deque()
        while self._queue:
            pending = self._queue.popleft()
            if pending.future.done():
                continue
            if pending.key == first.key and size + pending.batch_size <= min(
                self.target, self.max_batch_size
            ):
                batch.append(pending)
                size += pending.batch_size
            else:
                kept.append(pending)
        self._queue = kept
        return batch

    async def _run(self, instance: WorkerProcess, batch: list[_Pending]) -> None:
        """Execute one batch on one instance and answer each of its requests."""
        try:
            inputs = batch[0].inputs if len(batch) == 1 else merge(batch)
            execution: Execution = await instance.infer(inputs, batch[0].outputs)
            sizes = [p.batch_size for p in batch]
            shares = [execution.outputs] if len(batch) == 1 else split(execution.outputs, sizes)
        except OpserveError as error:
            now = time.monotonic_ns()
            for pending in batch:
                self.stats.record_failure(now - pending.arrival_ns)
                if not pending.future.done():
                    pending.future.set_exception(error)
            return
        finally:
            if self.batching:
                if instance in self._busy:
                    self._busy[instance] -= 1
                self._wakeup.set()
            else:
                self._release(instance)
        self.stats.record_execution(
            sum(sizes), execution.input_ns, execution.infer_ns, execution.output_ns
        )
        now = time.monotonic_ns()
        for pending, outputs in zip(batch, shares, strict=True):
            self.stats.record_success(
                pending.batch_size,
                now - pending.arrival_ns,
                max(execution.started_ns - pending.arrival_ns, 0),
                execution.input_ns,
                execution.infer_ns,
                execution.output_ns,
            )
            if not pending.future.done():
                pending.future.set_result(outputs)

    async def close(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.cancel()
        error = UnavailableError(f"{self.label} is being unloaded")
        for pending in self._queue:
            if not pending.future.done():
                pending.future.set_exception(error)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(error)
        self._queue.clear()
        self._waiters.clear()
