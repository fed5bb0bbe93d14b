"""The server's handle on one worker process: start it, talk to it, notice when it dies.

Requests are pipelined over a socket pair: each gets an id and a future; replies resolve the
futures in arrival order. Input tensors are copied once into the request ring, outputs once out
of the response ring; only small control messages cross the socket.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from opserve.errors import InternalError, OpserveError, error_from_code
from opserve.inference import Tensor
from opserve.workers.channel import FRAME, encode
from opserve.workers.messages import (
    Done,
    Failed,
    Infer,
    InferResult,
    LoadModel,
    Message,
    ModelLoaded,
    TensorRef,
    UnloadModel,
)
from opserve.workers.ring import ShmRing

log = logging.getLogger(__name__)

DEFAULT_RING_CAPACITY = 16 << 20


@dataclass(slots=True)
class Execution:
    """What one execution in a worker returned, with its timings (see `InferResult`)."""

    outputs: list[Tensor]
    started_ns: int
    input_ns: int
    infer_ns: int
    output_ns: int


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "is still running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown signal"
        return f"was killed by signal {-returncode} ({name})"
    return f"exited with status {returncode}"


class _ChannelProtocol(asyncio.Protocol):
    def __init__(self, on_message: Callable[[Message], None], on_lost: Callable[[], None]) -> None:
        self._buffer = bytearray()
        self._on_message = on_message
        self._on_lost = on_lost

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        offset = 0
        size = len(buffer)
        while size - offset >= FRAME.size:
            (length,) = FRAME.unpack_from(buffer, offset)
            end = offset + FRAME.size + length
            if end > size:
                break
            message = pickle.loads(buffer[offset + FRAME.size : end])
            offset = end
            self._on_message(message)
        if offset:
            del buffer[:offset]

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost()


class WorkerProcess:
    """One worker process, seen from the server's event loop."""

    def __init__(
        self,
        label: str,
        ring_capacity: int = DEFAULT_RING_CAPACITY,
        on_exit: Callable[[WorkerProcess, str], None] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.label = label
        self.env = env
        self.ring_capacity = ring_capacity
        self._on_exit = on_exit
        self._process: asyncio.subprocess.Process | None = None
        self._transport: asyncio.Transport | None = None
        self._requests: ShmRing | None = None
        self._responses: ShmRing | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._next_id = 0
        self._stopping = False
        self._exited = asyncio.Event()
        self.exit_reason = ""

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def alive(self) -> bool:
        return self._process is not None and not self._exited.is_set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._requests = ShmRing.create(self.ring_capacity, "opserve-requests")
        self._responses = ShmRing.create(self.ring_capacity, "opserve-responses")
        fds = (child.fileno(), self._requests.fd, self._responses.fd)
        try:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "opserve.workers.main",
                *(str(fd) for fd in fds),
                str(self.ring_capacity),
                pass_fds=fds,
                stdin=asyncio.subprocess.DEVNULL,
                env=self.env,
            )
        finally:
            child.close()
        parent.setblocking(False)
        self._transport, _ = await loop.create_unix_connection(
            lambda: _ChannelProtocol(self._dispatch, self._connection_lost), sock=parent
        )
        asyncio.ensure_future(self._watch())
        log.debug("worker %s started (pid %s)", self.label, self._process.pid)

    # requests ----------------------------------------------------------------------------------
    def _submit(self, build: Callable[[int], Message]) -> asyncio.Future[Any]:
        if not self.alive or self._transport is None or self._transport.is_closing():
            raise InternalError(
                f"the worker process of {self.label} {describe_exit(self._returncode())}"
            )
        self._next_id += 1
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[self._next_id] = future
        self._transport.write(encode(build(self._next_id)))
        return future

    async def load(self, **fields: Any) -> ModelLoaded:
        return await self._submit(lambda i: LoadModel(id=i, **fields))

    @property
    def in_flight(self) -> int:
        """Requests sent to this worker and not answered yet."""
        return len(self._pending)

    async def infer(self, inputs: list[Tensor], outputs: list[str] | None) -> Execution:
        ring = self._requests
        assert ring is not None
        refs = []
        for tensor in inputs:
            offset = ring.write(tensor.data)
            if offset is None:
                refs.append(
                    TensorRef(tensor.name, tensor.datatype, tensor.shape, inline=bytes(tensor.data))
                )
            else:
                refs.append(
                    TensorRef(tensor.name, tensor.datatype, tensor.shape, offset, len(tensor.data))
                )
        return await self._submit(lambda i: Infer(i, refs, outputs, ring.head))

    async def stop(self, timeout: float = 10.0) -> None:
        """Unload and end the process; kill it if it does not end in time."""
        self._stopping = True
        if self.alive:
            try:
                await asyncio.wait_for(self._submit(lambda i: UnloadModel(i)), timeout)
                await asyncio.wait_for(self._exited.wait(), timeout)
            except (asyncio.TimeoutError, OpserveError):
                pass
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
            await self._exited.wait()

    # replies -----------------------------------------------------------------------------------
    def _dispatch(self, message: Message) -> None:
        future = self._pending.pop(message.id, None)
        result: Execution | ModelLoaded | Done
        if isinstance(message, InferResult):
            result = Execution(
                self._read_outputs(message.outputs),
                message.started_ns,
                message.input_ns,
                message.infer_ns,
                message.output_ns,
            )
            self._responses.release(message.ring_end)  # type: ignore[union-attr]
        elif isinstance(message, Failed):
            if message.ring_end >= 0:
                self._responses.release(message.ring_end)  # type: ignore[union-attr]
            if future is not None and not future.done():
                future.set_exception(error_from_code(message.code, message.message))
            return
        elif isinstance(message, (ModelLoaded, Done)):
            result = message
        else:
            log.error("unexpected message from worker %s: %r", self.label, message)
            return
        if future is not None and not future.done():
            future.set_result(result)

    def _read_outputs(self, refs: list[TensorRef]) -> list[Tensor]:
        buffer = self._responses.buffer  # type: ignore[union-attr]
        return [
            Tensor(
                ref.name,
                ref.datatype,
                ref.shape,
                ref.inline
                if ref.inline is not None
                else bytes(buffer[ref.offset : ref.offset + ref.nbytes]),
            )
            for ref in refs
        ]

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
        for ring in (self._requests, self._responses):
            if ring is not None:
                ring.close()
        if not self._stopping:
            log.error("worker process %s (pid %s) %s", self.label, self.pid, self.exit_reason)
            if self._on_exit is not None:
                self._on_exit(self, self.exit_reason)
