"""The server's handle on one worker process: start it, talk to it, notice when it dies.

Executions are pipelined over a socket pair: each gets an id; the worker's answers find their
requests by id and index. Input tensors are copied once into the request ring, outputs once out
of the response ring (into the client's shared-memory region when the request names one there);
only small control messages cross the socket. The worker may also speak
first: a BLS request or a service call (logging, metrics) goes to the `WorkerHost`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from opserve.errors import InternalError, OpserveError, UnavailableError, error_from_code
from opserve.inference import (
    Delivery,
    InferenceRequest,
    InferenceResponse,
    OutputBuffer,
    Tensor,
)
from opserve.workers.channel import FrameDecoder, encode
from opserve.workers.launcher import Launcher
from opserve.workers.messages import (
    BlsRequest,
    BlsResult,
    Call,
    CallResult,
    Cancel,
    Done,
    Execute,
    Executed,
    Failed,
    LoadModel,
    Message,
    ModelLoaded,
    Responses,
    TensorRef,
    UnloadModel,
    WireError,
    WireRequest,
    WireResponse,
)
from opserve.workers.ring import ShmRing

log = logging.getLogger(__name__)

DEFAULT_RING_CAPACITY = 16 << 20
# how far a ring grows for batches larger than its capacity (shared memory per direction)
RING_LIMIT = 1 << 30


@dataclass(slots=True)
class Timings:
    """When the worker began an execution (`time.monotonic_ns()`, one clock for every process)
    and the nanoseconds it spent preparing inputs, executing, and writing outputs."""

    started_ns: int
    input_ns: int
    infer_ns: int
    output_ns: int


class Submission(Protocol):
    """A request handed to a worker, and where its responses go."""

    request: InferenceRequest

    def deliver(self, item: Delivery, final: bool) -> None: ...


class Instance(Protocol):
    """One model instance as the scheduler and the manager see it: a `WorkerProcess` of its own,
    or a slot of a shared one (`workers.shared.SharedInstance`)."""

    label: str
    exit_reason: str

    @property
    def pid(self) -> int | None: ...

    @property
    def alive(self) -> bool: ...

    async def start(self) -> None: ...

    async def load(self, timeout_s: float, **fields: Any) -> ModelLoaded: ...

    def execute(self, batch: Sequence[Submission], on_return: OnReturn) -> int: ...

    def cancel(self, execution: int, index: int) -> None: ...

    def presume_hung(self, error: OpserveError) -> None: ...

    async def stop(self, timeout: float = 10.0) -> None: ...


class WorkerHost(Protocol):
    """The server's side of what a model may ask for."""

    def bls(
        self, request: InferenceRequest, decoupled: bool, timeout_us: int
    ) -> AsyncIterator[tuple[Delivery, bool]]: ...

    def call(self, worker: WorkerProcess, service: str, arguments: dict[str, Any]) -> Any: ...

    def worker_ended(self, worker: WorkerProcess) -> None: ...

    def poll_us(self) -> int:
        """How long a worker polls for its next message after an execution starting now,
        instead of sleeping (see `opserve.polling`)."""
        ...


# called once per execution, as soon as the worker's `execute` returned (with its timings) or
# the execution failed (the worker died): synchronously, before any of the execution's answers is
# delivered, so that statistics are recorded before any waiter resumes and the caller can see to
# the next batch before the answers are written
OnReturn = Callable[["Timings | OpserveError"], None]


@dataclass(slots=True)
class _Running:
    batch: Sequence[Submission]
    on_return: OnReturn
    returned: bool = False  # `execute` returned in the worker (or the execution failed)
    open: set[int] = field(default_factory=set)  # requests without a final response
    deadline: asyncio.TimerHandle | None = None  # the execution timeout, while `execute` runs


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown signal"
        return f"was killed by signal {-returncode} ({name})"
    return f"exited with status {returncode}"


class _ChannelProtocol(asyncio.Protocol):
    def __init__(self, on_message: Callable[[Message], None], on_lost: Callable[[], None]) -> None:
        self._decoder = FrameDecoder()
        self._on_message = on_message
        self._on_lost = on_lost

    def data_received(self, data: bytes) -> None:
        for message in self._decoder.feed(data):
            self._on_message(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost()


class WorkerProcess:
    """One worker process, seen from the server's event loop."""

    def __init__(
        self,
        label: str,
        ring_capacity: int = DEFAULT_RING_CAPACITY,
        on_exit: Callable[[WorkerProcess, str], None] | None = None,
        launcher: Launcher | None = None,
        host: WorkerHost | None = None,
        title: str = "",
        execution_timeout_s: float = 0.0,
        shared: bool = False,
    ) -> None:
        self.label = label
        self.shared = shared  # hosts many models' instances, one slot each
        # how long one `execute` may run before the worker is presumed hung (0: no limit)
        self.execution_timeout_s = execution_timeout_s
        self.title = title  # `<model>:<version>`, what `ps` shows of the worker
        self.launcher = launcher or Launcher()
        self.ring_capacity = ring_capacity
        self.host = host
        self._on_exit = on_exit
        self._process: asyncio.subprocess.Process | None = None
        self._transport: asyncio.Transport | None = None
        self._requests: ShmRing | None = None
        self._responses: ShmRing | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}  # loads and unloads
        self._running: dict[int, _Running] = {}  # executions
        self._busy = 0  # executions whose `execute` has not returned
        self._next_id = 0
        self._stopping = False
        self._exited = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.exit_reason = ""

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def alive(self) -> bool:
        return self._process is not None and not self._exited.is_set()

    @property
    def in_flight(self) -> int:
        """Executions sent to this worker whose `execute` has not returned."""
        return self._busy

    async def start(self) -> None:
        """Start the process. Running out of resources (file descriptors, processes, memory)
        is an UNAVAILABLE error naming the cause, with nothing left open."""
        try:
            await self._start()
        except OSError as exc:
            self._stopping = True
            self.kill()
            if self._process is None:
                self._exited.set()  # nothing to wait for
            for ring in (self._requests, self._responses):
                if ring is not None:
                    ring.close()
            if self._transport is not None:
                self._transport.close()
            raise UnavailableError(
                f"cannot start a worker process for {self.label}: {exc.strerror or exc}"
            ) from None

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            limit = max(self.ring_capacity, RING_LIMIT)
            self._requests = ShmRing.create(self.ring_capacity, "opserve-requests", limit)
            self._responses = ShmRing.create(self.ring_capacity, "opserve-responses", limit)
            fds = (child.fileno(), self._requests.fd, self._responses.fd)
            self._process = await asyncio.create_subprocess_exec(
                *self.launcher.command(fds, self.ring_capacity, self.title, self.shared, limit),
                pass_fds=fds,
                stdin=asyncio.subprocess.DEVNULL,
                env=self.launcher.env,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        asyncio.ensure_future(self._watch())
        parent.setblocking(False)
        self._transport, _ = await loop.create_unix_connection(
            lambda: _ChannelProtocol(self._dispatch, self._connection_lost), sock=parent
        )
        log.debug("worker %s started (pid %s)", self.label, self._process.pid)

    # requests ----------------------------------------------------------------------------------
    def _check_alive(self) -> asyncio.Transport:
        if not self.alive or self._transport is None or self._transport.is_closing():
            returncode = self._returncode()
            if returncode is None:  # its socket closed before its exit was seen
                state = "is ending (its connection closed)"
            else:
                state = describe_exit(returncode)
            raise InternalError(f"the worker process of {self.label} {state}")
        return self._transport

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _submit(self, build: Callable[[int], Message]) -> asyncio.Future[Any]:
        transport = self._check_alive()
        message_id = self._new_id()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[message_id] = future
        transport.write(encode(build(message_id)))
        return future

    async def load(self, timeout_s: float, **fields: Any) -> ModelLoaded:
        """Load (or describe) the model; a load that takes longer than `timeout_s` (a hung
        `initialize`, say) stops the worker. A shared worker (whose loads run one after the
        other) is killed as a crashed one is, so that its other models start again elsewhere."""
        try:
            return await asyncio.wait_for(
                self._submit(lambda i: LoadModel(id=i, **fields)), timeout_s
            )
        except asyncio.TimeoutError:
            if not self.shared:
                self._stopping = True  # no restart: the load failed
            self.kill()
            label = f"model '{fields.get('model_name')}'" if self.shared else self.label
            raise UnavailableError(
                f"{label} did not finish loading in {timeout_s:g} s "
                f"(--model-load-timeout-secs); its {'shared ' if self.shared else ''}worker was "
                "stopped"
            ) from None

    async def unload(self, slot: int, timeout_s: float) -> None:
        """Unload one slot of a shared worker (after its executions); the others go on. With
        `timeout_s` 0 the unload is sent without waiting for it."""
        done = self._submit(lambda i: UnloadModel(i, slot))
        if timeout_s <= 0:
            done.add_done_callback(lambda f: f.cancelled() or f.exception())
            return
        await asyncio.wait_for(done, timeout_s)

    def execute(
        self,
        batch: Sequence[Submission],
        on_return: OnReturn,
        slot: int = 0,
        timeout_s: float | None = None,
        label: str = "",
    ) -> int:
        """Send a batch for one execution and return its id. `on_return` gets its timings once
        `execute` has returned in the worker (see `OnReturn`); responses reach each submission's
        `deliver`. `slot`, `timeout_s` and `label`: the instance of a shared worker, its model's
        execution timeout and name."""
        transport = self._check_alive()
        ring = self._requests
        assert ring is not None
        wires = [_wire_request(s.request) for s in batch]
        ring.ensure(sum(len(t.data) for s in batch for t in s.request.inputs))
        if len(batch) == 1:
            for tensor, ref in zip(batch[0].request.inputs, wires[0].inputs, strict=True):
                _place(ring, [tensor], [ref])
        else:  # each input's tensors end to end, so the worker merges them without a copy
            for position in range(len(wires[0].inputs)):
                name = wires[0].inputs[position].name
                tensors = [_input(s.request, name) for s in batch]
                refs = [_ref(w, name) for w in wires]
                _place(ring, tensors, refs)
        execution = self._new_id()
        poll_us = self.host.poll_us() if self.host is not None else 0
        # encoded first: a batch too large for one message is refused with nothing registered
        message = encode(Execute(execution, wires, ring.head, slot, poll_us))
        running = _Running(batch, on_return, open=set(range(len(batch))))
        timeout = self.execution_timeout_s if timeout_s is None else timeout_s
        if timeout > 0:
            running.deadline = asyncio.get_running_loop().call_later(
                timeout, self._execution_expired, execution, timeout, label or self.label
            )
        self._running[execution] = running
        self._busy += 1
        transport.write(message)
        return execution

    def cancel(self, execution: int, index: int) -> None:
        """Tell the model that a request's client went away (`is_cancelled`)."""
        if execution in self._running and self.alive and self._transport is not None:
            self._transport.write(encode(Cancel(execution, index)))

    async def stop(self, timeout: float = 10.0) -> None:
        """Unload and end the process; kill it if it has not ended within `timeout` seconds
        (a hung or stopped worker is killed then, a cancelled stop kills at once)."""
        self._stopping = True
        try:
            if self.alive and timeout > 0:
                await asyncio.wait_for(self._unload(), timeout)
        except (asyncio.TimeoutError, OpserveError):
            pass
        finally:
            self.kill()
        await self._exited.wait()

    async def _unload(self) -> None:
        await self._submit(lambda i: UnloadModel(i))
        await self._exited.wait()

    def kill(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.kill()

    def presume_hung(self, error: OpserveError) -> None:
        """An `execute` call that should have returned has not (Python code and native ops
        cannot be interrupted from outside): every request this worker holds fails with
        `error`, and the worker is killed, to be replaced like a crashed one."""
        if not self.alive:
            return
        log.error("%s: %s", self.label, error.message)
        for running in self._running.values():
            if running.deadline is not None:
                running.deadline.cancel()
            for index in sorted(running.open):
                running.batch[index].deliver(error, True)
            running.open.clear()
        self.kill()

    def _execution_expired(self, execution: int, timeout: float, label: str) -> None:
        running = self._running.get(execution)
        if running is None or running.returned:
            return
        shared = f" (the shared worker {self.label}, with every model it holds)" * self.shared
        self.presume_hung(
            UnavailableError(
                f"{label}: an execution did not return within {timeout:g} s "
                "(the execution timeout: EXECUTION_TIMEOUT_SECS in the model's parameters, or "
                f"--execution-timeout-secs); its worker process{shared} was killed and is being "
                "replaced"
            )
        )

    # what the worker says ----------------------------------------------------------------------
    def _dispatch(self, message: Message) -> None:
        if isinstance(message, Responses):
            self._responses_arrived(message)
        elif isinstance(message, Executed):
            self._executed(message.id, message.timings)
        elif isinstance(message, BlsRequest):
            request = self._bls_request(message)
            self._background(self._serve_bls(message.id, request, message))
        elif isinstance(message, Call):
            self._serve_call(message)
        elif isinstance(message, Failed):
            if message.ring_end >= 0:
                self._responses.release(message.ring_end)  # type: ignore[union-attr]
            future = self._pending.pop(message.id, None)
            if future is not None and not future.done():
                future.set_exception(error_from_code(message.code, message.message))
        elif isinstance(message, (ModelLoaded, Done)):
            future = self._pending.pop(message.id, None)
            if future is not None and not future.done():
                future.set_result(message)
        else:
            log.error("unexpected message from worker %s: %r", self.label, message)

    def _responses_arrived(self, message: Responses) -> None:
        running = self._running.get(message.id)
        if running is None:
            self._responses.release(message.ring_end)  # type: ignore[union-attr]
            return
        deliveries = [
            (wire, self._delivery(wire, running.batch[wire.index].request.output_buffers))
            for wire in message.responses
        ]
        self._responses.release(message.ring_end)  # type: ignore[union-attr]
        if message.timings is not None:  # the execution returned: said before its answers
            self._returned(running, Timings(*message.timings))
        for wire, item in deliveries:
            if wire.final:
                running.open.discard(wire.index)
            running.batch[wire.index].deliver(item, wire.final)
        if not running.open and running.returned:
            del self._running[message.id]

    def _executed(self, execution: int, timings: tuple[int, int, int, int]) -> None:
        running = self._running.get(execution)
        if running is None:
            return
        self._returned(running, Timings(*timings))
        if not running.open:
            del self._running[execution]

    def _returned(self, running: _Running, outcome: Timings | OpserveError) -> None:
        if running.deadline is not None:
            running.deadline.cancel()
        if running.returned:
            return
        running.returned = True
        self._busy -= 1
        try:
            running.on_return(outcome)
        except Exception:  # the caller's fault must not lose the execution's answers
            log.exception("%s: handling a returned execution failed", self.label)

    def _delivery(
        self, wire: WireResponse, destinations: dict[str, OutputBuffer] | None
    ) -> Delivery:
        if wire.error is not None:
            return error_from_code(wire.error.code, wire.error.message)
        if wire.outputs is None:
            return None
        try:
            outputs = self._read_tensors(wire.outputs, destinations)
        except OpserveError as exc:  # an output does not fit the client's region
            return exc
        return InferenceResponse("", "", outputs, parameters=wire.parameters)

    def _read_tensors(
        self, refs: list[TensorRef], destinations: dict[str, OutputBuffer] | None = None
    ) -> list[Tensor]:
        """The tensors out of the response ring: copied into the client's shared memory for
        the outputs it asked there, else into bytes of their own."""
        ring = self._responses
        assert ring is not None
        tensors = []
        for ref in refs:
            data: bytes | memoryview
            if ref.inline is not None:
                data = ref.inline
            else:
                data = ring.view(ref.offset, ref.nbytes)
            destination = destinations.get(ref.name) if destinations else None
            if destination is not None:
                data = destination.write(data)
            elif not isinstance(data, bytes):
                data = bytes(data)
            tensors.append(Tensor(ref.name, ref.datatype, ref.shape, data))
        return tensors

    # the model's own requests ------------------------------------------------------------------
    def _bls_request(self, message: BlsRequest) -> InferenceRequest:
        wire = message.request
        inputs = self._read_tensors(wire.inputs)
        self._responses.release(message.ring_end)  # type: ignore[union-attr]
        return InferenceRequest(
            wire.model_name,
            wire.model_version,
            inputs,
            wire.outputs,
            wire.id,
            wire.parameters,
            correlation_id=wire.correlation_id,
            flags=wire.flags,
        )

    async def _serve_bls(self, call: int, request: InferenceRequest, message: BlsRequest) -> None:
        if self.host is None:
            stream = _single(InternalError("this worker has no server to run requests on"))
        else:
            stream = self.host.bls(request, message.decoupled, message.timeout_us)
        async for item, final in stream:
            if not self.alive or self._transport is None:
                return
            ring = self._requests
            assert ring is not None
            if isinstance(item, OpserveError):
                wire = WireResponse(0, None, WireError(item.code.value, item.message), final)
            elif item is None:
                wire = WireResponse(0, None, None, final)
            else:
                refs = [_ref_for(t) for t in item.outputs]
                _place_each(ring, item.outputs, refs)
                wire = WireResponse(0, refs, None, final, item.parameters)
            self._transport.write(encode(BlsResult(call, wire, ring.head)))

    def _serve_call(self, message: Call) -> None:
        try:
            if self.host is None:
                raise InternalError("this worker has no server to call")
            value = self.host.call(self, message.service, message.arguments)
        except Exception as exc:
            self._answer_call(message, None, exc)
            return
        if inspect.isawaitable(value):  # a call that takes a while (loading a model, say)
            self._background(self._await_call(message, value))
        else:
            self._answer_call(message, value, None)

    async def _await_call(self, message: Call, value: Any) -> None:
        try:
            result = await value
        except Exception as exc:
            self._answer_call(message, None, exc)
            return
        self._answer_call(message, result, None)

    def _answer_call(self, message: Call, value: Any, exc: Exception | None) -> None:
        if isinstance(exc, OpserveError):
            answer = CallResult(message.id, None, WireError(exc.code.value, exc.message))
        elif exc is not None:  # a bad call must not break the channel
            log.error("service call %s from %s failed: %r", message.service, self.label, exc)
            answer = CallResult(message.id, None, WireError("INTERNAL", str(exc)))
        else:
            answer = CallResult(message.id, value)
        if message.id and self._transport is not None and not self._transport.is_closing():
            self._transport.write(encode(answer))

    def _background(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # the end of a worker -----------------------------------------------------------------------
    def _returncode(self) -> int | None:
        return self._process.returncode if self._process else None

    def _connection_lost(self) -> None:
        if self._transport is not None:
            self._transport.close()

    async def _watch(self) -> None:
        assert self._process is not None
        returncode = await self._process.wait()
        self.exit_reason = describe_exit(returncode)
        self._exited.set()
        if self._transport is not None:
            self._transport.close()
        error = InternalError(f"the worker process of {self.label} {self.exit_reason}")
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)
        running, self._running = self._running, {}
        for execution in running.values():
            for index in sorted(execution.open):
                execution.batch[index].deliver(error, True)
            self._returned(execution, error)
        self._busy = 0
        for task in list(self._tasks):
            task.cancel()
        for ring in (self._requests, self._responses):
            if ring is not None:
                ring.close()
        if self.host is not None:
            self.host.worker_ended(self)
        if not self._stopping:
            log.error("worker process %s (pid %s) %s", self.label, self.pid, self.exit_reason)
            if self._on_exit is not None:
                self._on_exit(self, self.exit_reason)


async def _single(error: OpserveError) -> AsyncIterator[tuple[Delivery, bool]]:
    yield error, True


def _wire_request(request: InferenceRequest) -> WireRequest:
    return WireRequest(
        request.id,
        [_ref_for(t) for t in request.inputs],
        request.requested_outputs,
        request.parameters,
        request.correlation_id,
        request.flags,
        timeout_us=request.timeout_us,
    )


def _ref_for(tensor: Tensor) -> TensorRef:
    return TensorRef(tensor.name, tensor.datatype, tensor.shape)


def _input(request: InferenceRequest, name: str) -> Tensor:
    for tensor in request.inputs:
        if tensor.name == name:
            return tensor
    raise InternalError(f"input '{name}' is missing from a request of the batch")


def _ref(wire: WireRequest, name: str) -> TensorRef:
    for ref in wire.inputs:
        if ref.name == name:
            return ref
    raise InternalError(f"input '{name}' is missing from a request of the batch")


def _place(ring: ShmRing, tensors: list[Tensor], refs: list[TensorRef]) -> None:
    """Copy tensors end to end into the ring and point their refs there (inline if no room)."""
    total = sum(len(t.data) for t in tensors)
    offset = ring.reserve(total) if total else None
    if offset is None:
        for tensor, ref in zip(tensors, refs, strict=True):
            ref.inline = bytes(tensor.data)
        return
    buffer = ring.buffer
    for tensor, ref in zip(tensors, refs, strict=True):
        size = len(tensor.data)
        buffer[offset : offset + size] = tensor.data
        ref.offset, ref.nbytes = offset, size
        offset += size


def _place_each(ring: ShmRing, tensors: list[Tensor], refs: list[TensorRef]) -> None:
    for tensor, ref in zip(tensors, refs, strict=True):
        _place(ring, [tensor], [ref])
