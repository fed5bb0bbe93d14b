"""The sequence batcher (`sequence_batching`): the requests of one sequence, identified by
their correlation id, reach one instance, in order, with the control inputs and implicit state
the config asks for.

Each instance has a `_Lane` of slots (`max_batch_size`, or `oldest.max_candidate_sequences`; 1
without batching). A sequence takes a free slot at its START and keeps it until its END request
runs, or until it has been idle for `max_sequence_idle_microseconds`; a sequence that finds no
free slot waits in the backlog for one, as in Triton. An instance runs one batch at a time, and
a sequence has at most one request in it, so each request sees the state its predecessor left.

- direct: a batch holds one request per ready slot, in slot order; empty slots below the
  highest used one carry null requests (READY false), as Triton's direct batcher does.
- oldest: a batch holds the oldest requests of different sequences of one instance, waiting
  up to `max_queue_delay_microseconds` for the largest preferred size.

The implicit state is kept here, in the server: the state input goes with each request, the
state output comes back with its response and is taken out of it before the client sees it. A
worker that dies loses the sequences of its slots; their later requests get an error saying so.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from opserve.datatypes import element_count, serialize_bytes
from opserve.errors import InternalError, InvalidArgumentError, OpserveError, UnavailableError
from opserve.inference import Delivery, InferenceRequest, InferenceResponse, Tensor
from opserve.proto import ModelConfig
from opserve.scheduler import Scheduler, _Pending
from opserve.sequence_config import FLAG_SEQUENCE_END, FLAG_SEQUENCE_START, SequenceSettings
from opserve.stats import VersionStats
from opserve.workers.process import Instance

log = logging.getLogger(__name__)

LOST_SEQUENCES_REMEMBERED = 10_000


@dataclass(eq=False)
class _Sequence:
    id: int | str
    lane: _Lane | None = None  # None while in the backlog
    slot: int = -1
    queue: deque[_Pending] = field(default_factory=deque)
    running: bool = False  # one of its requests is executing
    ended: bool = False  # its END request arrived; a later request needs a new START
    state: dict[str, Tensor] = field(default_factory=dict)  # by state input name
    idle_timer: asyncio.TimerHandle | None = None


@dataclass(eq=False)
class _Lane:
    """One instance and the sequences that hold its slots."""

    worker: Instance
    slots: list[_Sequence | None]


@dataclass(slots=True, eq=False)
class _Step(_Pending):
    """A request of a sequence: its state output is kept before its answer goes out."""

    keep_state: Callable[[_Pending, InferenceResponse], Delivery] | None = field(
        default=None, repr=False
    )
    wake: Callable[[], None] | None = field(default=None, repr=False)

    def deliver(self, item: Delivery, final: bool) -> None:
        if isinstance(item, InferenceResponse) and self.keep_state is not None:
            item = self.keep_state(self, item)
        _Pending.deliver(self, item, final)

    def cancel(self) -> None:
        _Pending.cancel(self)
        if self.wake is not None:
            self.wake()  # its place in the sequence's queue is given up


# pure batch planning ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Head:
    """The next request of a sequence that may run now."""

    slot: int
    arrival_ns: int
    key: tuple[object, ...]


def plan_direct(
    heads: list[Head], slots: int, utilization: float, delay_ns: int, now_ns: int
) -> tuple[list[int | None] | None, int | None]:
    """Direct strategy: the batch as slot positions (None: a null request pads an empty slot
    below the highest used one), or None and the time to look again (waiting for more slots to
    be ready, up to the delay)."""
    if not heads:
        return None, None
    oldest = min(heads, key=lambda h: h.arrival_ns)
    if delay_ns and utilization and len(heads) < utilization * slots:
        deadline = oldest.arrival_ns + delay_ns
        if now_ns < deadline:
            return None, deadline
    chosen = {h.slot for h in heads if h.key == oldest.key}
    return [s if s in chosen else None for s in range(max(chosen) + 1)], None


def plan_oldest(
    heads: list[Head], target: int, delay_ns: int, now_ns: int
) -> tuple[list[int] | None, int | None]:
    """Oldest strategy: the slots of the oldest requests (one per sequence, of one shape) up to
    `target`, or None and the time to look again (waiting for a full batch, up to the delay)."""
    if not heads:
        return None, None
    ordered = sorted(heads, key=lambda h: h.arrival_ns)
    first = ordered[0]
    chosen = [h.slot for h in ordered if h.key == first.key][:target]
    deadline = first.arrival_ns + delay_ns
    if len(chosen) < target and now_ns < deadline:
        return None, deadline
    return chosen, None


def null_inputs(inputs: list[Tensor]) -> list[Tensor]:
    """A null request's inputs: the shapes of a real request of the batch, all zeros."""
    made = []
    for tensor in inputs:
        if tensor.datatype == "BYTES":
            data = serialize_bytes([b""] * element_count(tensor.shape))
        else:
            data = bytes(len(tensor.data))
        made.append(Tensor(tensor.name, tensor.datatype, tensor.shape, data))
    return made


def scheduler_for(
    label: str, config: ModelConfig, stats: VersionStats, decoupled: bool, model_dir: Path
) -> Scheduler:
    """The scheduler a version's config asks for."""
    if config.HasField("sequence_batching"):
        settings = SequenceSettings.from_config(config, model_dir)
        return SequenceScheduler(label, config, stats, decoupled, settings)
    return Scheduler(label, config, stats, decoupled)


# the scheduler ---------------------------------------------------------------------------------
class SequenceScheduler(Scheduler):
    """The requests of one sequence-batched model version, onto that version's instances."""

    pending_class = _Step

    def __init__(
        self,
        label: str,
        config: ModelConfig,
        stats: VersionStats,
        decoupled: bool = False,
        settings: SequenceSettings | None = None,
    ) -> None:
        super().__init__(label, config, stats, decoupled)
        self.settings = settings or SequenceSettings.from_config(config)
        self.batching = True  # batches form here; one batch at a time per instance
        self.depth = 1
        self._lanes: list[_Lane] = []
        self._sequences: dict[int | str, _Sequence] = {}
        self._backlog: deque[_Sequence] = deque()
        self._steps: dict[_Pending, _Sequence] = {}
        self._lost: OrderedDict[int | str, str] = OrderedDict()  # id -> why
        self._state_outputs = {s.output_name: s for s in self.settings.states}

    # instances ---------------------------------------------------------------------------------
    def add_instance(self, worker: Instance) -> None:
        lane = _Lane(worker, [None] * self.settings.slots)
        self._lanes.append(lane)
        super().add_instance(worker)
        for slot in range(len(lane.slots)):
            self._fill(lane, slot)
        self._kick()

    def remove_instance(self, worker: Instance) -> None:
        """Its sequences are lost (their state lived with the requests it was running)."""
        super().remove_instance(worker)
        for lane in [lane for lane in self._lanes if lane.worker is worker]:
            self._lanes.remove(lane)
            reason = f"the instance serving it stopped ({worker.exit_reason or 'removed'})"
            for sequence in lane.slots:
                if sequence is not None:
                    self._lose(sequence, reason)

    def _lose(self, sequence: _Sequence, reason: str) -> None:
        if self._sequences.get(sequence.id) is sequence:
            del self._sequences[sequence.id]
        self._lost[sequence.id] = reason
        while len(self._lost) > LOST_SEQUENCES_REMEMBERED:
            self._lost.popitem(last=False)
        error = self._lost_error(sequence.id, reason)
        while sequence.queue:
            pending = sequence.queue.popleft()
            self._steps.pop(pending, None)
            if pending.waiting:
                pending.deliver(error, True)
        if sequence.idle_timer is not None:
            sequence.idle_timer.cancel()

    def _lost_error(self, correlation_id: int | str, reason: str) -> OpserveError:
        return InternalError(
            f"sequence {correlation_id} of {self.label} was lost: {reason}; start it again "
            "with sequence_start"
        )

    # requests ----------------------------------------------------------------------------------
    # `infer` and `stream` are the base class's: a request is refused or joins its sequence in
    # `_pending`, `_enqueue` only wakes the dispatcher, and no request runs outside a batch.
    def _idle_instance(self) -> Instance | None:
        return None

    def _enqueue(self, pending: _Pending, on_wait: Callable[[], None] | None) -> None:
        if on_wait is not None and pending.request.client_gone is None:
            on_wait()
        self._kick()

    def _check(self, request: InferenceRequest, batch_size: int) -> None:
        """Triton's checks of a sequence request, before it is queued."""
        model = request.model_name
        if batch_size > 1:
            raise InvalidArgumentError(
                f"inference request to model '{model}' must specify batch-size 1 due to "
                "requirements of sequence batcher"
            )
        correlation_id = request.correlation_id
        if correlation_id == 0 or correlation_id == "":
            raise InvalidArgumentError(
                f"inference request to model '{model}' must specify a non-zero or non-empty "
                "correlation ID"
            )
        corrid = self.settings.corrid
        if corrid is not None:
            given = "BYTES" if isinstance(correlation_id, str) else "UINT64"
            if (given == "BYTES") != (corrid.datatype == "BYTES"):
                prefix = f"[request id: {request.id}] " if request.id else ""
                raise InvalidArgumentError(
                    f"{prefix}sequence batching control '{corrid.name}' data-type is "
                    f"'{given}', but model '{model}' expects '{corrid.datatype}'"
                )

    def _pending(self, request: InferenceRequest, batch_size: int) -> _Pending:
        """Queue a request with its sequence (starting one at START), or refuse it."""
        self._check(request, batch_size)
        correlation_id = request.correlation_id
        start = bool(request.flags & FLAG_SEQUENCE_START)
        sequence = self._sequences.get(correlation_id)
        if sequence is None and not start:
            reason = self._lost.get(correlation_id)
            if reason is not None:
                raise self._lost_error(correlation_id, reason)
            raise InvalidArgumentError(
                f"inference request for sequence {correlation_id} to model "
                f"'{request.model_name}' must specify the START flag on the first request of "
                "the sequence"
            )
        if sequence is None:
            sequence = _Sequence(correlation_id)
            self._sequences[correlation_id] = sequence
            self._lost.pop(correlation_id, None)
            self._place(sequence)
        elif start:
            log.warning(
                "sequence %s for %s has a conflict. The previous sequence did not end before "
                "this sequence start. Previous sequence will be terminated early.",
                correlation_id,
                self.label,
            )
        pending = super()._pending(request, batch_size)
        assert isinstance(pending, _Step)
        pending.on_finish = self._finished
        pending.keep_state = self._keep_state
        pending.wake = self._kick
        sequence.queue.append(pending)
        self._steps[pending] = sequence
        if request.flags & FLAG_SEQUENCE_END:
            sequence.ended = True
            del self._sequences[correlation_id]
        self._watch_idle(sequence)
        self._kick()
        return pending

    # slots and the backlog ---------------------------------------------------------------------
    def _place(self, sequence: _Sequence) -> None:
        """A free slot (the lowest slot number first, across instances), else the backlog."""
        best: tuple[int, int] | None = None
        for index, lane in enumerate(self._lanes):
            if not lane.worker.alive:
                continue
            for slot, holder in enumerate(lane.slots):
                if holder is None and (best is None or slot < best[1]):
                    best = (index, slot)
                    break
        if best is None:
            self._backlog.append(sequence)
            return
        lane = self._lanes[best[0]]
        lane.slots[best[1]] = sequence
        sequence.lane, sequence.slot = lane, best[1]

    def _fill(self, lane: _Lane, slot: int) -> None:
        """A freed slot goes to the first sequence of the backlog that still wants one."""
        lane.slots[slot] = None
        while self._backlog:
            sequence = self._backlog.popleft()
            if sequence.queue or not sequence.ended:
                lane.slots[slot] = sequence
                sequence.lane, sequence.slot = lane, slot
                return

    def _release_if_done(self, sequence: _Sequence) -> None:
        """An ended sequence whose requests have all been taken gives its slot back."""
        if sequence.ended and not sequence.queue and sequence.lane is not None:
            lane, slot = sequence.lane, sequence.slot
            sequence.lane = None
            if sequence.idle_timer is not None:
                sequence.idle_timer.cancel()
            if lane in self._lanes and lane.slots[slot] is sequence:
                self._fill(lane, slot)

    def _watch_idle(self, sequence: _Sequence) -> None:
        if sequence.idle_timer is not None:
            sequence.idle_timer.cancel()
        sequence.idle_timer = asyncio.get_running_loop().call_later(
            self.settings.idle_ns / 1e9, self._idle, sequence
        )

    def _idle(self, sequence: _Sequence) -> None:
        """No request for `max_sequence_idle_microseconds`: the sequence is released."""
        sequence.idle_timer = None
        if sequence.running or any(p.waiting for p in sequence.queue):
            self._watch_idle(sequence)  # still being served: it is not idle
            return
        log.warning(
            "sequence %s of %s was idle for more than %d us and is released",
            sequence.id,
            self.label,
            self.settings.idle_ns // 1000,
        )
        if self._sequences.get(sequence.id) is sequence:
            del self._sequences[sequence.id]
        for pending in sequence.queue:
            self._steps.pop(pending, None)
        sequence.queue.clear()
        sequence.ended = True
        if sequence in self._backlog:
            self._backlog.remove(sequence)
        self._release_if_done(sequence)
        self._kick()

    # batches -----------------------------------------------------------------------------------
    def _kick(self) -> None:
        self._wakeup.set()
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.ensure_future(self._dispatch())

    def _heads(self, lane: _Lane) -> dict[int, _Pending]:
        """Each slot's next request that may run now (dropping those nobody waits for)."""
        heads: dict[int, _Pending] = {}
        for slot, sequence in enumerate(lane.slots):
            if sequence is None:
                continue
            while sequence.queue and not sequence.queue[0].waiting:
                self._steps.pop(sequence.queue.popleft(), None)
            if sequence.queue and not sequence.running:
                heads[slot] = sequence.queue[0]
            else:
                self._release_if_done(sequence)
        return heads

    async def _dispatch(self) -> None:
        """Form a batch for every idle instance with ready requests; sleep until something
        changes (or a batch's delay ends)."""
        while True:
            now = time.monotonic_ns()
            wake: int | None = None
            work = False
            for lane in list(self._lanes):
                heads = self._heads(lane)
                if not heads:
                    continue
                work = True
                if self._busy.get(lane.worker, 1) or not lane.worker.alive:
                    continue
                planned, deadline = self._plan(heads, now)
                if planned is not None:
                    self._launch(lane, planned, heads)
                elif deadline is not None:
                    wake = deadline if wake is None else min(wake, deadline)
            if not work and not self._steps:
                return
            await self._wait(None if wake is None else max(wake - time.monotonic_ns(), 0))

    def _plan(
        self, heads: dict[int, _Pending], now: int
    ) -> tuple[list[int | None] | list[int] | None, int | None]:
        summary = [Head(slot, p.arrival_ns, p.key) for slot, p in heads.items()]
        settings = self.settings
        if settings.strategy == "oldest":
            return plan_oldest(summary, settings.target, settings.delay_ns, now)
        return plan_direct(
            summary, settings.slots, settings.minimum_slot_utilization, settings.delay_ns, now
        )

    def _launch(
        self, lane: _Lane, planned: list[int | None] | list[int], heads: dict[int, _Pending]
    ) -> None:
        first = heads[next(s for s in planned if s is not None)].request
        # nulls copy a real request as the client sent it (before controls and state join it)
        template = InferenceRequest(
            first.model_name, first.model_version, list(first.inputs), first.requested_outputs
        )
        batch: list[_Pending] = []
        taken: list[_Sequence] = []
        for slot in planned:
            if slot is None:
                # a decoupled model answers when it likes, and might never close a null request
                if not self.decoupled:
                    batch.append(self._null(template))
                continue
            pending = heads[slot]
            sequence = self._steps[pending]
            sequence.queue.popleft()
            sequence.running = True
            self._attach(pending, sequence)
            batch.append(pending)
            taken.append(sequence)
        for sequence in taken:  # after every request of the batch has its inputs
            self._release_if_done(sequence)
        self._busy[lane.worker] += 1
        self._background(self._run(lane.worker, batch))

    def _attach(self, pending: _Pending, sequence: _Sequence) -> None:
        """The control inputs and the state input join the request; the state output is asked
        for."""
        request = pending.request
        start = bool(request.flags & FLAG_SEQUENCE_START)
        if start or not sequence.state:
            sequence.state = {s.input_name: s.initial for s in self.settings.states}
        end = bool(request.flags & FLAG_SEQUENCE_END)
        request.inputs = [
            *request.inputs,
            *self.settings.control_tensors(start, end, True, request.correlation_id),
            *sequence.state.values(),
        ]
        if request.requested_outputs is not None:
            request.requested_outputs = [*request.requested_outputs, *self._state_outputs]

    def _null(self, template: InferenceRequest) -> _Pending:
        """A request that only fills a slot: READY false, its answer dropped, not counted."""
        corrid = self.settings.corrid
        empty_id: int | str = "" if corrid is not None and corrid.datatype == "BYTES" else 0
        inputs = [
            *null_inputs(template.inputs),
            *self.settings.control_tensors(False, False, False, empty_id),
            *(s.initial for s in self.settings.states),
        ]
        outputs = template.requested_outputs
        if outputs is not None:
            outputs = [*outputs, *self._state_outputs]
        request = InferenceRequest(template.model_name, template.model_version, inputs, outputs)
        future = asyncio.get_running_loop().create_future()
        null = _Pending(request, 1, time.monotonic_ns(), (), future, None)
        null.counted = True
        return null

    def _finished(self, pending: _Pending) -> None:
        """A request's final answer (its state kept already): its sequence may go on."""
        sequence = self._steps.pop(pending, None)
        if sequence is not None and pending.execution is not None:
            sequence.running = False
        self._account(pending)
        self._wakeup.set()

    def _keep_state(self, pending: _Pending, response: InferenceResponse) -> Delivery:
        """The state outputs leave the response and become the sequence's state; a response
        without them is an error."""
        sequence = self._steps.get(pending)
        if not self._state_outputs or sequence is None:
            return response
        kept: list[Tensor] = []
        state: dict[str, Tensor] = {}
        for tensor in response.outputs:
            spec = self._state_outputs.get(tensor.name)
            if spec is None:
                kept.append(tensor)
            elif tensor.datatype != spec.datatype:
                return InternalError(
                    f"{self.label} produced state output '{tensor.name}' as {tensor.datatype}; "
                    f"the config says {spec.datatype}"
                )
            else:
                state[spec.input_name] = Tensor(
                    spec.input_name, tensor.datatype, tensor.shape, tensor.data
                )
        missing = [s.output_name for s in self.settings.states if s.input_name not in state]
        if missing:
            return InternalError(
                f"{self.label} did not produce the state output(s) {missing} for sequence "
                f"{sequence.id}"
            )
        sequence.state.update(state)
        response.outputs = kept
        return response

    async def close(self) -> None:
        await super().close()
        error = UnavailableError(f"{self.label} is being unloaded")
        sequences = {id(s): s for s in self._steps.values()}
        for sequence in sequences.values():
            if sequence.idle_timer is not None:
                sequence.idle_timer.cancel()
            for pending in sequence.queue:
                if pending.waiting:
                    pending.deliver(error, True)
            sequence.queue.clear()
        for sequence in self._sequences.values():
            if sequence.idle_timer is not None:
                sequence.idle_timer.cancel()
        self._sequences.clear()
        self._backlog.clear()
