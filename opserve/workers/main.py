"""The worker process: hosts one model version and executes its requests in order.

Started by the server as `python -m opserve.workers.main SOCKET_FD REQUEST_RING_FD
RESPONSE_RING_FD RING_CAPACITY`. The server never imports a framework; this process does.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

import numpy as np

from opserve.backends import Backend, BackendContext, backend_class
from opserve.datatypes import NUMPY_DTYPES, deserialize_bytes, numpy_to_v2, serialize_bytes
from opserve.errors import InternalError, OpserveError
from opserve.proto import ModelConfig, model_config_pb2
from opserve.workers.channel import BlockingChannel
from opserve.workers.messages import (
    Done,
    Failed,
    Infer,
    InferResult,
    LoadModel,
    ModelLoaded,
    TensorRef,
    UnloadModel,
)
from opserve.workers.ring import ShmRing

log = logging.getLogger("opserve.worker")


class Worker:
    def __init__(self, channel: BlockingChannel, requests: ShmRing, responses: ShmRing) -> None:
        self.channel = channel
        self.requests = requests
        self.responses = responses
        self.backend: Backend | None = None
        self.bf16_outputs: set[str] = set()  # outputs whose 16-bit words are BF16

    def serve(self) -> None:
        while (message := self.channel.receive()) is not None:
            if isinstance(message, Infer):
                self.channel.send(self.infer(message))
            elif isinstance(message, LoadModel):
                self.channel.send(self.load(message))
            elif isinstance(message, UnloadModel):
                if self.backend is not None:
                    self.backend.unload()
                    self.backend = None
                self.channel.send(Done(message.id))
                return

    def load(self, message: LoadModel) -> ModelLoaded | Failed:
        config = ModelConfig()
        config.ParseFromString(message.config)
        context = BackendContext(
            config=config,
            model_dir=Path(message.model_dir),
            version_dir=Path(message.version_dir),
            op_libraries=[Path(p) for p in message.op_libraries],
            server_op_libraries=[Path(p) for p in message.server_op_libraries],
            preloaded_libraries=[Path(p) for p in message.preloaded_libraries],
        )
        try:
            backend = backend_class(config.backend)(context)
            backend.load()
            signature = backend.signature()
        except OpserveError as exc:
            return Failed(message.id, exc.code.value, exc.message)
        except Exception as exc:  # a backend bug must not kill the worker silently
            log.exception("loading model '%s' failed", message.model_name)
            return Failed(message.id, "INTERNAL", f"{type(exc).__name__}: {exc}")
        self.backend = backend
        self.bf16_outputs = {
            o.name for o in config.output if o.data_type == model_config_pb2.TYPE_BF16
        }
        libraries = [str(p) for p in backend.loaded_op_libraries]
        return ModelLoaded(message.id, signature, libraries)

    def infer(self, message: Infer) -> InferResult | Failed:
        started = time.monotonic_ns()
        try:
            if self.backend is None:
                raise InternalError("no model is loaded in this worker")
            inputs = {ref.name: self._input_array(ref) for ref in message.inputs}
            prepared = time.monotonic_ns()
            results = self.backend.execute(inputs, message.outputs)
            executed = time.monotonic_ns()
            outputs = [self._write_output(name, array) for name, array in results.items()]
        except OpserveError as exc:
            return Failed(message.id, exc.code.value, exc.message, self.responses.head)
        except Exception as exc:
            log.exception("inference failed")
            return Failed(
                message.id, "INTERNAL", f"{type(exc).__name__}: {exc}", self.responses.head
            )
        finally:
            self.requests.release(message.ring_end)
        return InferResult(
            message.id,
            outputs,
            self.responses.head,
            started,
            prepared - started,
            executed - prepared,
            time.monotonic_ns() - executed,
        )

    def _input_array(self, ref: TensorRef) -> np.ndarray:
        data = (
            ref.inline
            if ref.inline is not None
            else self.requests.buffer[ref.offset : ref.offset + ref.nbytes]
        )
        dtype = NUMPY_DTYPES[ref.datatype]
        if dtype is None:
            array = np.empty(len(elements := deserialize_bytes(data)), dtype=np.object_)
            array[:] = elements
            return array.reshape(ref.shape)
        return np.frombuffer(data, dtype=dtype).reshape(ref.shape)

    def _write_output(self, name: str, array: np.ndarray) -> TensorRef:
        array = np.asarray(array)
        datatype = numpy_to_v2(array.dtype)
        if name in self.bf16_outputs and array.dtype.itemsize == 2:
            datatype = "BF16"
        if datatype == "BYTES":
            data: bytes | memoryview = serialize_bytes(
                e if isinstance(e, (bytes, str)) else str(e) for e in array.reshape(-1)
            )
        else:
            data = np.ascontiguousarray(array).data.cast("B")
        shape = tuple(int(d) for d in array.shape)
        offset = self.responses.write(data)
        if offset is None:
            return TensorRef(name, datatype, shape, inline=bytes(data))
        return TensorRef(name, datatype, shape, offset, len(data))


def main(argv: list[str]) -> int:
    sock_fd, request_fd, response_fd, capacity = (int(a) for a in argv[:4])
    # Ctrl-C reaches the whole process group: the server decides when a worker ends (it closes
    # the socket or sends UnloadModel), so the worker ignores SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=os.environ.get("OPSERVE_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s %(levelname)s worker[{os.getpid()}] %(name)s: %(message)s",
    )
    sock = socket.socket(fileno=sock_fd)
    worker = Worker(
        BlockingChannel(sock), ShmRing(request_fd, capacity), ShmRing(response_fd, capacity)
    )
    try:
        worker.serve()
    except (BrokenPipeError, ConnectionResetError):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
