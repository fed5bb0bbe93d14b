"""The worker process: hosts one instance of one model version, or (`--shared`) the instances
of many framework models, each in a slot of its own.

Started by the server (see `launcher`) as `python -m opserve.workers.main SOCKET_FD
REQUEST_RING_FD RESPONSE_RING_FD RING_CAPACITY [TITLE] [--shared]`. The server never imports a
framework; this process does.

A shared worker (see `repository/placement`) runs each slot's executions in order, the slots at
once on a pool of threads (`_Lanes`; framework calls let go of the GIL), and loads and unloads
slots on a thread of their own, so the reader keeps handing out the other models' executions
while one model loads or unloads; a slot unloads once its executions are done.

Whoever waits reads (leader and followers): one thread at a time reads the socket, the thread
that needs a message next. An idle main thread reads, so an execution that arrives runs on the
thread that read it, without a hand-over between threads (two context switches per request, and
most of a worker's system calls, before). A thread waiting for the answer to a call of its own
(a BLS request, a metric value) reads while no one else does; what it reads for others it hands
over: loads and executions, in order, to the main thread; answers to whoever waits for them;
cancellations into their requests. While an execution runs and no one waits, no one reads: a
model asking `is_cancelled` reads what has arrived without waiting (`poll`). Anything may send
(a decoupled model answers from its own threads): a message and the ring writes it refers to
are made under the channel's lock, so ring positions follow message order.

This module and what it imports need only the standard library and numpy (protobuf only for a
framework backend), so a Python model may run under another interpreter.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from opserve import collector
from opserve.allocator import keep_freed_memory
from opserve.backends import Backend, BackendContext, Reply, Request, backend_class
from opserve.datatypes import NUMPY_DTYPES, deserialize_bytes, numpy_to_v2, serialize_bytes
from opserve.errors import InternalError, OpserveError, error_from_code
from opserve.workers.channel import BlockingChannel
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
from opserve.workers.ring import Releases, ShmRing

log = logging.getLogger("opserve.worker")

T = TypeVar("T")


@dataclass
class _Execution:
    """An execution whose requests are not all answered (decoupled models answer later)."""

    id: int
    requests: list[Request]
    release: list[int | bool]  # its entry in the request ring's releases
    open: set[int] = field(default_factory=set)  # indexes without a final response yet
    returned: bool = False  # `execute` has returned


@dataclass
class _Hosted:
    """One model instance in this worker (slot 0 in a worker of its own)."""

    backend: Backend
    bf16_outputs: set[str] = field(default_factory=set)  # outputs whose 16-bit words are BF16


# a shared worker's pool: executions of that many slots at once at most (threads are started only
# while that many are busy), so a model's `instance_group` count stays its executions in flight
SHARED_EXECUTION_THREADS = 64


class _Lanes:
    """A shared worker's executions: each slot's in order, different slots at once."""

    def __init__(self, run: Any, threads: int = SHARED_EXECUTION_THREADS) -> None:
        self._run = run
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="slot")
        self._queues: dict[int, deque[tuple[Execute, list[int | bool]]]] = {}
        self._changed = threading.Condition()

    def submit(self, slot: int, execution: Execute, release: list[int | bool]) -> None:
        with self._changed:
            queue = self._queues.get(slot)
            if queue is not None:  # the slot's thread takes it next
                queue.append((execution, release))
                return
            self._queues[slot] = deque([(execution, release)])
        self._pool.submit(self._drain, slot)

    def _drain(self, slot: int) -> None:
        while True:
            with self._changed:
                queue = self._queues[slot]
                if not queue:
                    del self._queues[slot]
                    self._changed.notify_all()
                    return
                execution, release = queue[0]
            try:
                self._run(execution, release)
            except Exception:  # `execute` answers its own failures; this is a bug
                log.exception("execution %d failed", execution.id)
            with self._changed:
                queue.popleft()

    def wait_idle(self, slot: int | None = None) -> None:
        """Until the slot (None: every slot) has nothing queued or running."""
        with self._changed:
            self._changed.wait_for(
                lambda: not self._queues if slot is None else slot not in self._queues
            )


class Worker:
    def __init__(
        self,
        channel: BlockingChannel,
        requests: ShmRing,
        responses: ShmRing,
        shared: bool = False,
    ) -> None:
        self.channel = channel
        self.requests = requests
        self.responses = responses
        self.releases = Releases(requests)
        self.shared = shared
        self.hosted: dict[int, _Hosted] = {}  # slot -> instance
        # a shared worker: executions on the slots' lanes, loads and unloads on a thread of their own
        self._lanes = _Lanes(self.execute) if shared else None
        self._admin = ThreadPoolExecutor(1, thread_name_prefix="load") if shared else None
        # reading: who reads, and what was read for others; guarded by `_mutex` (a plain lock:
        # entered a few times per execution), `_changed` wakes the threads waiting for a turn
        self._mutex = threading.Lock()
        self._changed = threading.Condition(self._mutex)
        self._sleepers = 0  # threads waiting on `_changed` (none: nothing to notify)
        self._reading = False  # a thread is reading the socket
        self._gone = False  # the server has gone
        self._tasks: deque[tuple[Message, list[int | bool] | None]] = deque()
        self._waiting: dict[int, deque[tuple[Message, list[int | bool]]]] = {}
        self._executions: dict[int, _Execution] = {}
        self._lock = threading.Lock()  # guards _executions
        self._ids = itertools.count(1)
        self._poll_us = 0  # how long to poll before sleeping: the last execution's `poll_us`

    # threads -----------------------------------------------------------------------------------
    def serve(self) -> None:
        while (task := self._next_task()) is not None:
            message, release = task
            if isinstance(message, Execute):
                assert release is not None
                if self._lanes is not None:
                    self._lanes.submit(message.slot, message, release)
                else:
                    self.execute(message, release)
            elif isinstance(message, LoadModel):
                if self._admin is not None:
                    self._admin.submit(self._answer_load, message)
                else:
                    loaded = self.load(message)
                    # a dedicated worker holds this model until it ends: its heap as loaded
                    # stays out of later collections (collector)
                    collector.settle()
                    self.channel.send(loaded)
            elif isinstance(message, UnloadModel):
                if message.slot is not None and self._admin is not None:
                    self._admin.submit(self._unload_slot, message.id, message.slot)
                    continue
                if self._admin is not None and self._lanes is not None:
                    self._admin.shutdown(wait=True)
                    self._lanes.wait_idle()
                for slot in list(self.hosted):
                    self._unload(slot)
                self.channel.send(Done(message.id))
                return

    def _answer_load(self, message: LoadModel) -> None:
        try:
            self.channel.send(self.load(message))
        except OSError:  # the server has gone; the reader notices
            pass

    def _unload_slot(self, message_id: int, slot: int) -> None:
        """A shared worker's slot leaves once its executions are done; the others go on."""
        assert self._lanes is not None
        self._lanes.wait_idle(slot)
        self._unload(slot)
        try:
            self.channel.send(Done(message_id))
        except OSError:
            pass

    def _unload(self, slot: int) -> None:
        hosted = self.hosted.pop(slot, None)
        if hosted is not None:
            try:
                hosted.backend.unload()
            except Exception:
                log.exception("unloading the model of slot %d failed", slot)

    def _next_task(self) -> tuple[Message, list[int | bool] | None] | None:
        """The main thread's next load, execution or unload; None once the server has gone."""
        return self._take(self._tasks)

    def _await(
        self, answers: deque[tuple[Message, list[int | bool]]]
    ) -> tuple[Message, list[int | bool]]:
        """The next answer to one of this thread's calls."""
        found = self._take(answers)
        return found if found is not None else (_GONE, [0, True])

    def _take(self, queue: deque[T]) -> T | None:
        """The first item of `queue` (filled under `_mutex`): one another thread read
        and handed over, or, when no one is reading, one this thread reads itself; None once
        the server has gone."""
        with self._mutex:
            while not queue:
                if self._gone:
                    return None
                if not self._reading:
                    self._reading = True
                    break
                self._sleepers += 1
                self._changed.wait()
                self._sleepers -= 1
            else:
                return queue.popleft()
        return self._read_until(lambda: queue.popleft() if queue else None)

    def _read_until(self, take: Any) -> Any:
        """Read as the one reader, handing out what is read, until `take` (called under the
        lock) finds something; the reader's role then passes on. None if the server went."""
        try:
            while True:
                try:
                    message = self.channel.receive(self._poll_us)
                except OSError:
                    message = None
                with self._mutex:
                    if message is None:
                        self._gone = True
                        return None
                    self._hand_out(message)
                    found = take()
                    if found is not None:
                        return found
        finally:
            with self._mutex:
                self._reading = False
                self._wake()

    def poll(self) -> None:
        """Read what has arrived, without waiting, when no one is reading (a model asking
        whether its request was cancelled while it executes)."""
        with self._mutex:
            if self._reading or self._gone:
                return
            self._reading = True
        try:
            while True:
                try:
                    message = self.channel.receive_ready()
                except OSError:
                    message = None
                    with self._mutex:
                        self._gone = True
                if message is None:
                    return
                with self._mutex:
                    self._hand_out(message)
        finally:
            with self._mutex:
                self._reading = False
                self._wake()

    def _hand_out(self, message: Message) -> None:
        """Where a message read goes (the caller holds `_mutex`)."""
        if isinstance(message, (Execute, BlsResult)):
            release = self.releases.register(message.ring_end)
            if isinstance(message, BlsResult):
                self._deliver(message.id, message, release)
            else:
                # a shared worker's reader hands executions to other threads: polling, it
                # would hold up their every wait for the GIL
                self._poll_us = 0 if self.shared else message.poll_us
                self._tasks.append((message, release))
        elif isinstance(message, CallResult):
            self._deliver(message.id, message, [0, True])
        elif isinstance(message, Cancel):
            with self._lock:
                execution = self._executions.get(message.id)
            if execution is not None and message.index < len(execution.requests):
                execution.requests[message.index].cancelled = True
            return
        else:
            self._tasks.append((message, None))
        self._wake()

    def _wake(self) -> None:
        """Wake the threads waiting for a turn, if any (the caller holds `_mutex`)."""
        if self._sleepers:
            self._changed.notify_all()

    def _deliver(self, call: int, message: Message, release: list[int | bool]) -> None:
        waiting = self._waiting.get(call)
        if waiting is not None:
            waiting.append((message, release))
        elif isinstance(message, BlsResult):
            self.releases.finish(release)

    # loading -----------------------------------------------------------------------------------
    def load(self, message: LoadModel) -> ModelLoaded | Failed:
        context = BackendContext(
            config_bytes=message.config,
            config_json=message.config_json,
            model_dir=Path(message.model_dir),
            version_dir=Path(message.version_dir),
            op_libraries=[Path(p) for p in message.op_libraries],
            server_op_libraries=[Path(p) for p in message.server_op_libraries],
            preloaded_libraries=[Path(p) for p in message.preloaded_libraries],
            model_name=message.model_name,
            version=message.version,
            instance_name=message.instance_name,
            repository=message.repository,
            library_frameworks=message.library_frameworks,
            services=self,
            auto_complete=message.auto_complete,
            shared=self.shared,
        )
        config = context.config_dict
        try:
            hosted = self.hosted.get(message.slot)
            if hosted is None:
                backend = backend_class(config.get("backend", ""))(context)
                hosted = self.hosted[message.slot] = _Hosted(backend)
            if message.describe:
                description = hosted.backend.describe()
                return ModelLoaded(
                    message.id,
                    description.signature,
                    [str(p) for p in hosted.backend.loaded_op_libraries],
                    description.config_json,
                )
            hosted.backend.start(context)
        except OpserveError as exc:
            return Failed(message.id, exc.code.value, exc.message)
        except Exception as exc:  # a backend bug must not kill the worker silently
            log.exception("loading model '%s' failed", message.model_name)
            return Failed(message.id, "INTERNAL", f"{type(exc).__name__}: {exc}")
        hosted.bf16_outputs = {
            o["name"] for o in config.get("output", []) if o.get("data_type") == "TYPE_BF16"
        }
        libraries = [str(p) for p in hosted.backend.loaded_op_libraries]
        return ModelLoaded(message.id, None, libraries)

    # executing ---------------------------------------------------------------------------------
    def execute(self, message: Execute, release: list[int | bool]) -> None:
        started = time.monotonic_ns()
        hosted = self.hosted.get(message.slot)
        requests: list[Request] = []
        try:
            requests = [self._request(message.id, i, r) for i, r in enumerate(message.requests)]
            if hosted is None:
                raise InternalError("no model is loaded in this worker")
            backend = hosted.backend
            execution = _Execution(message.id, requests, release, set(range(len(requests))))
            with self._lock:  # a model may answer through response senders, even from `run`
                self._executions[message.id] = execution
            prepared = time.monotonic_ns()
            replies = backend.run(requests)
            executed = time.monotonic_ns()
        except Exception as exc:
            self._fail_execution(message.id, requests or message.requests, release, exc)
            return
        if replies is None:  # decoupled: every answer goes through a response sender
            # from the model's own threads, most likely: a reader polling for the next message
            # would hold up their every wait for the GIL
            self._poll_us = 0
            timings = (started, prepared - started, executed - prepared, 0)
            self.channel.send(Executed(message.id, timings))
        else:
            try:
                if len(replies) != len(requests):
                    raise InternalError(
                        f"the backend returned {len(replies)} replies for {len(requests)} requests"
                    )
                with self.channel.lock:
                    self.responses.ensure(sum(_outputs_nbytes(r) for r in replies))
                    wires = [
                        self._wire_response(i, reply, hosted.bf16_outputs)
                        for i, reply in enumerate(replies)
                        if reply is not None
                    ]
                    with self._lock:
                        execution.open.difference_update(w.index for w in wires)
                    timings = (
                        started,
                        prepared - started,
                        executed - prepared,
                        time.monotonic_ns() - executed,
                    )
                    self.channel.send_locked(
                        Responses(message.id, wires, self.responses.head, timings)
                    )
            except Exception as exc:
                self._fail_execution(message.id, requests, release, exc)
                return
        execution.returned = True
        self._maybe_finish(execution)

    def _fail_execution(
        self, execution: int, requests: list[Any], release: list[int | bool], exc: Exception
    ) -> None:
        if not isinstance(exc, OpserveError):
            log.exception("inference failed")
        error = _wire_error(exc)
        with self._lock:
            state = self._executions.pop(execution, None)
        indexes = sorted(state.open) if state is not None else range(len(requests))
        with self.channel.lock:
            wires = [WireResponse(i, None, error, True) for i in indexes]
            self.channel.send_locked(Responses(execution, wires, self.responses.head, (0, 0, 0, 0)))
        self.releases.finish(release)

    def _request(self, execution: int, index: int, wire: WireRequest) -> Request:
        return Request(
            index,
            execution,
            wire.id,
            {ref.name: self._input_array(ref) for ref in wire.inputs},
            wire.outputs,
            wire.parameters,
            wire.correlation_id,
            wire.flags,
            wire.timeout_us,
        )

    def _input_array(self, ref: TensorRef) -> np.ndarray:
        data = ref.inline if ref.inline is not None else self.requests.view(ref.offset, ref.nbytes)
        dtype = NUMPY_DTYPES[ref.datatype]
        if dtype is None:
            objects = np.empty(len(elements := deserialize_bytes(data)), dtype=np.object_)
            objects[:] = elements
            return objects.reshape(ref.shape)
        array = np.frombuffer(data, dtype=dtype).reshape(ref.shape)
        array.flags.writeable = False
        return array

    # answering ---------------------------------------------------------------------------------
    def respond(self, request: Request, reply: Reply | None, final: bool) -> None:
        """A decoupled model's response (from any thread); `final` closes the request."""
        with self._lock:
            execution = self._executions.get(request.execution)
            if execution is None or request.index not in execution.open:
                raise InternalError("the response sender of this request is closed")
            if final:
                execution.open.discard(request.index)
        with self.channel.lock:
            if reply is None:
                wire = WireResponse(request.index, None, None, final)
            else:
                hosted = self.hosted.get(0)
                bf16 = hosted.bf16_outputs if hosted is not None else set()
                wire = self._wire_response(request.index, reply, bf16, final)
            self.channel.send_locked(Responses(request.execution, [wire], self.responses.head))
        if final:
            self._maybe_finish(execution)

    def _maybe_finish(self, execution: _Execution) -> None:
        with self._lock:
            if execution.open or not execution.returned:
                return
            if self._executions.pop(execution.id, None) is None:
                return
        self.releases.finish(execution.release)

    def _wire_response(
        self, index: int, reply: Reply, bf16: set[str], final: bool = True
    ) -> WireResponse:
        """Outputs written into the response ring (the caller holds the channel's lock);
        `bf16`: the outputs whose 16-bit words are BF16."""
        if reply.error is not None:
            return WireResponse(index, None, _wire_error(reply.error), final, reply.parameters)
        outputs = reply.outputs or {}
        refs = [self.write_tensor(name, array, name in bf16) for name, array in outputs.items()]
        return WireResponse(index, refs, None, final, reply.parameters)

    def write_tensor(self, name: str, array: np.ndarray, bf16: bool = False) -> TensorRef:
        """Copy one tensor into the response ring (the caller holds the channel's lock)."""
        array = np.asarray(array)
        datatype = numpy_to_v2(array.dtype)
        if bf16 and array.dtype.itemsize == 2:
            datatype = "BF16"
        if datatype == "BYTES":
            data: bytes | memoryview = serialize_bytes(
                e if isinstance(e, (bytes, str)) else str(e) for e in array.reshape(-1)
            )
        else:
            contiguous = np.ascontiguousarray(array)
            # a memoryview cannot be cast from a shape with a 0 in it ([1, 0])
            data = contiguous.data.cast("B") if contiguous.size else b""
        shape = array.shape  # numpy's: a tuple of ints
        offset = self.responses.write(data)
        if offset is None:
            return TensorRef(name, datatype, shape, inline=bytes(data))
        return TensorRef(name, datatype, shape, offset, len(data))

    # the model's own calls ---------------------------------------------------------------------
    def infer(
        self, request: WireRequest, inputs: dict[str, np.ndarray], decoupled: bool, timeout_us: int
    ) -> Iterator[Reply]:
        """Run a request on any model the server has (BLS); replies as they come, the last one
        final. Output arrays are the worker's own copies."""
        call = next(self._ids)
        answers: deque[tuple[Message, list[int | bool]]] = deque()
        with self._mutex:
            self._waiting[call] = answers
        try:
            with self.channel.lock:
                request.inputs = [self.write_tensor(n, a) for n, a in inputs.items()]
                self.channel.send_locked(
                    BlsRequest(call, request, decoupled, timeout_us, self.responses.head)
                )
            while True:
                message, release = self._await(answers)
                if isinstance(message, CallResult):  # the server went away
                    assert message.error is not None
                    yield Reply(error=error_from_code(message.error.code, message.error.message))
                    return
                assert isinstance(message, BlsResult)
                try:
                    reply = self._reply(message.response)
                finally:
                    self.releases.finish(release)
                yield reply
                if message.response.final:
                    return
        finally:
            with self._mutex:
                del self._waiting[call]

    def _reply(self, wire: WireResponse) -> Reply:
        if wire.error is not None:
            return Reply(error=error_from_code(wire.error.code, wire.error.message))
        outputs = None
        if wire.outputs is not None:
            outputs = {ref.name: np.array(self._input_array(ref)) for ref in wire.outputs}
        return Reply(outputs, None, wire.parameters)

    def call(self, service: str, arguments: dict[str, Any], wait: bool) -> Any:
        """A call on a server service (logging, metrics); its answer when `wait`."""
        if not wait:
            self.channel.send(Call(0, service, arguments))
            return None
        call = next(self._ids)
        answers: deque[tuple[Message, list[int | bool]]] = deque()
        with self._mutex:
            self._waiting[call] = answers
        try:
            self.channel.send(Call(call, service, arguments))
            message, _ = self._await(answers)
        finally:
            with self._mutex:
                del self._waiting[call]
        assert isinstance(message, CallResult)
        if message.error is not None:
            raise error_from_code(message.error.code, message.error.message)
        return message.value


_GONE = CallResult(0, error=WireError("UNAVAILABLE", "the server has gone"))


def _outputs_nbytes(reply: Reply | None) -> int:
    """The bytes a reply's tensors take in the response ring (strings: their elements)."""
    if reply is None or not reply.outputs:
        return 0
    return sum(getattr(array, "nbytes", 0) for array in reply.outputs.values())


def _wire_error(exc: BaseException) -> WireError:
    if isinstance(exc, OpserveError):
        return WireError(exc.code.value, exc.message)
    return WireError("INTERNAL", f"{type(exc).__name__}: {exc}")


def _name_process(title: str) -> None:
    """The process's short name (`ps -e`, `top`): the model it serves, as far as 15 bytes go."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_name = 15
        libc.prctl(pr_set_name, title.removeprefix("opserve-worker:").encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the command line still names it


def _end_with_the_server() -> None:
    """Have the kernel kill this worker when the server ends, however it ends (killed, crashed,
    stopped during start-up), so that no worker outlives it (a hung one included)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the worker still ends when its socket closes, unless it hangs


def main(argv: list[str]) -> int:
    _end_with_the_server()
    keep_freed_memory()  # tensors are copied into and out of the rings
    collector.tune()
    shared = "--shared" in argv
    argv = [a for a in argv if a != "--shared"]
    sock_fd, request_fd, response_fd = (int(a) for a in argv[:3])
    capacity, _, limit = argv[3].partition(":")  # <capacity>[:<limit>]
    if len(argv) > 4:
        _name_process(argv[4])
    # Ctrl-C reaches the whole process group: the server decides when a worker ends (it closes
    # the socket or sends UnloadModel), so the worker ignores SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=os.environ.get("OPSERVE_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s %(levelname)s worker[{os.getpid()}] %(name)s: %(message)s",
    )
    sock = socket.socket(fileno=sock_fd)
    worker = Worker(
        BlockingChannel(sock),
        ShmRing(request_fd, int(capacity)),
        ShmRing(response_fd, int(capacity), int(limit or 0)),
        shared,
    )
    try:
        worker.serve()
    except (BrokenPipeError, ConnectionResetError):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
