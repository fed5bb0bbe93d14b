"""Shared workers, seen from the server: one worker process per key (a framework backend, under
the server's interpreter) holding the instances of many models, each in a slot of its own.

`SharedWorkers` starts a key's process when an instance first needs it (one start at a time per
key) and numbers the slots. A `SharedInstance` is one model instance in a slot: what the
scheduler and the manager hold, with a `WorkerProcess`'s surface. Stopping it unloads its slot
(after the slot's executions) while the process goes on serving the others; the process stops
when its last instance has left. When the process ends unasked (a crash, a kill, a hung execution
presumed dead), every instance it held is told, as if each had crashed alone: the manager
replaces each, in a new shared process, and its requests in flight have failed with the reason.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Any

from opserve.errors import InternalError, OpserveError
from opserve.workers.messages import ModelLoaded
from opserve.workers.process import OnReturn, Submission, WorkerProcess

log = logging.getLogger(__name__)

ProcessFactory = Callable[[str, Callable[[WorkerProcess, str], None]], WorkerProcess]


class SharedWorkers:
    """The shared worker processes of a server, by key."""

    def __init__(self, make_process: ProcessFactory) -> None:
        self._make_process = make_process  # (key, on_exit) -> a shared WorkerProcess, not started
        self._processes: dict[str, WorkerProcess] = {}
        self._members: dict[WorkerProcess, set[SharedInstance]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._slots = itertools.count(1)

    def process(self, key: str) -> WorkerProcess | None:
        """The key's running process, if any."""
        process = self._processes.get(key)
        return process if process is not None and process.alive else None

    def members(self, process: WorkerProcess) -> set[SharedInstance]:
        return set(self._members.get(process, ()))

    async def attach(self, key: str, instance: SharedInstance) -> tuple[WorkerProcess, int]:
        """A slot for `instance` in the key's process, started first if none runs."""
        async with self._locks.setdefault(key, asyncio.Lock()):
            process = self.process(key)
            if process is None:
                process = self._make_process(key, self._exited)
                await process.start()  # an UnavailableError when it cannot start
                self._processes[key] = process
                self._members[process] = set()
            self._members[process].add(instance)
            return process, next(self._slots)

    async def detach(self, instance: SharedInstance, process: WorkerProcess) -> None:
        """`instance` has left its slot; a process left with no instance stops."""
        members = self._members.get(process)
        if members is None:
            return
        members.discard(instance)
        if members:
            return
        del self._members[process]
        for key, running in list(self._processes.items()):
            if running is process:  # a new instance of this key gets a new process
                del self._processes[key]
        await process.stop()

    def _exited(self, process: WorkerProcess, reason: str) -> None:
        """The process ended unasked: each instance it held ends with it."""
        members = self._members.pop(process, set())
        for key, running in list(self._processes.items()):
            if running is process:
                del self._processes[key]
        log.error("%s %s: restarting its %d model instances", process.label, reason, len(members))
        for instance in members:
            instance.ended(reason)

    async def close(self) -> None:
        """Stop every process still running (the server stops)."""
        processes = list(self._members)
        self._members.clear()
        self._processes.clear()
        await asyncio.gather(*(p.stop(0.0) for p in processes), return_exceptions=True)


class SharedInstance:
    """One model instance in a slot of a shared worker."""

    def __init__(
        self,
        pool: SharedWorkers,
        key: str,
        label: str,
        on_exit: Callable[[SharedInstance, str], None] | None = None,
        execution_timeout_s: float = 0.0,
    ) -> None:
        self.pool = pool
        self.key = key
        self.label = label
        self.execution_timeout_s = execution_timeout_s
        self.exit_reason = ""
        self.process: WorkerProcess | None = None
        self.slot = 0
        self._on_exit = on_exit
        self._left = False  # stopped, or ended with its process

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def alive(self) -> bool:
        return not self._left and self.process is not None and self.process.alive

    async def start(self) -> None:
        self.process, self.slot = await self.pool.attach(self.key, self)

    async def load(self, timeout_s: float, **fields: Any) -> ModelLoaded:
        return await self._process().load(timeout_s, slot=self.slot, **fields)

    def execute(self, batch: Sequence[Submission], on_return: OnReturn) -> int:
        return self._process().execute(
            batch, on_return, self.slot, self.execution_timeout_s, self.label
        )

    def cancel(self, execution: int, index: int) -> None:
        if self.process is not None:
            self.process.cancel(execution, index)

    def presume_hung(self, error: OpserveError) -> None:
        """Code that cannot be interrupted holds the shared process: it is killed, and every
        model it held starts again."""
        if self.alive and self.process is not None:
            self.process.presume_hung(error)

    async def stop(self, timeout: float = 10.0) -> None:
        """Unload the slot (after its executions; at most `timeout` s, else the process is
        presumed hung and killed; 0: without waiting) and leave the process."""
        process = self.process
        if self._left or process is None:
            self._left = True
            return
        self._left = True
        try:
            if process.alive:
                await process.unload(self.slot, timeout)
        except asyncio.TimeoutError:
            log.error("%s did not unload in %g s: its shared worker is killed", self.label, timeout)
            process.kill()
        except OpserveError:
            pass  # the process ended meanwhile
        finally:
            await self.pool.detach(self, process)

    def ended(self, reason: str) -> None:
        """The shared process ended unasked."""
        if self._left:
            return
        self._left = True
        self.exit_reason = reason
        if self._on_exit is not None:
            self._on_exit(self, reason)

    def _process(self) -> WorkerProcess:
        if self.process is None or self._left:
            raise InternalError(f"{self.label} has left its shared worker")
        return self.process
