"""`inference.GRPCInferenceService`: its handlers, calling the same DataPlane as HTTP (the
transport is opserve's own: `calls.py` on `http2.py`).

One error boundary: every method answers an opserve error with its status code and a bug with
INTERNAL and a message (`_answer`); on a `ModelStreamInfer` stream every request gets exactly
one answer or one error, whatever its handling raised.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from google.protobuf import json_format

from opserve.dataplane import DataPlane, as_told_by
from opserve.errors import (
    ErrorCode,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    OpserveError,
)
from opserve.frontends.access import Restriction, forwarded
from opserve.frontends.grpc.calls import CallContext, CallError, GrpcCalls, Status
from opserve.frontends.grpc.codec import (
    decode_infer_request,
    encode_infer_answer,
    encode_infer_response,
)
from opserve.frontends.grpc.http2 import KeepaliveSettings
from opserve.frontends.grpc.server import GrpcServer, methods_of, tls_context
from opserve.frontends.grpc.templates import InferTemplates
from opserve.frontends.limits import GRPC_DEFAULT_MAX_INPUT_SIZE, ConnectionLimits
from opserve.inference import InferenceResponse
from opserve.proto import service_pb2

log = logging.getLogger(__name__)

OFFLOAD_ELEMENTS = (
    65_536  # typed BYTES elements in a request beyond which it is decoded in a thread
)

T = TypeVar("T")

# The one place where opserve's error codes become gRPC status codes.
GRPC_STATUS = {
    ErrorCode.INVALID_ARG: Status.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: Status.NOT_FOUND,
    ErrorCode.UNAVAILABLE: Status.UNAVAILABLE,
    ErrorCode.UNSUPPORTED: Status.UNIMPLEMENTED,
    ErrorCode.INTERNAL: Status.INTERNAL,
    ErrorCode.ALREADY_EXISTS: Status.ALREADY_EXISTS,
    ErrorCode.CANCELLED: Status.CANCELLED,
    ErrorCode.UNKNOWN: Status.UNKNOWN,
}


def as_opserve_error(exc: Exception, method: str) -> OpserveError:
    """What a call's exception tells the client: an opserve error as it is, anything else (a
    bug) as INTERNAL with its type and message, logged with its traceback."""
    if isinstance(exc, OpserveError):
        return exc
    log.error("unhandled error in gRPC %s", method, exc_info=exc)
    return InternalError(f"internal error: {type(exc).__name__}: {exc}")


async def _answer(context: CallContext, call: Callable[[], Awaitable[T]]) -> T:
    """Run `call`; an opserve error becomes the matching gRPC status, a bug INTERNAL."""
    try:
        return await call()
    except CallError:
        raise
    except Exception as exc:
        error = as_opserve_error(exc, getattr(call, "__name__", "call"))
        await context.abort(GRPC_STATUS.get(error.code, Status.UNKNOWN), error.message)


def _infer_error(error: OpserveError) -> OpserveError:
    return as_told_by(error, "ModelInfer RPC")


def _call_error(exc: BaseException) -> CallError:
    """An exception of `ModelInfer` as the status that ends its call."""
    if isinstance(exc, CallError):
        return exc
    if isinstance(exc, asyncio.CancelledError):  # the server stops
        return CallError(Status.UNAVAILABLE, "the request was cancelled: the server stops")
    if not isinstance(exc, Exception):
        return CallError(Status.INTERNAL, f"{type(exc).__name__}: {exc}")
    error = _infer_error(as_opserve_error(exc, "ModelInfer"))
    return CallError(GRPC_STATUS.get(error.code, Status.UNKNOWN), error.message)


def _infer_answer(outcome: InferenceResponse | BaseException) -> Any:
    """The response message for `ModelInfer`'s outcome, or the `CallError` that ends it."""
    if isinstance(outcome, BaseException):
        return _call_error(outcome)
    try:
        return encode_infer_answer(outcome)
    except Exception as exc:
        return _call_error(exc)


def _typed_bytes_elements(request: Any) -> int:
    return sum(len(t.contents.bytes_contents) for t in request.inputs)


def _unary(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """A unary method inside the error boundary."""

    @functools.wraps(method)
    async def guarded(self: Any, request: Any, context: CallContext) -> Any:
        return await _answer(context, lambda: method(self, request, context))

    return guarded


class InferenceServicer:
    def __init__(
        self,
        dataplane: DataPlane,
        forward: re.Pattern[str] | None = None,
    ) -> None:
        self.dataplane = dataplane
        self.forward = forward  # --grpc-header-forward-pattern
        self.templates = InferTemplates()  # ModelInfer messages decoded lately

    async def _decode(self, request: Any) -> Any:
        """The request as the dataplane takes it; one with many typed BYTES elements (their
        length-prefixed layout is built element by element) is decoded in a thread, which lets
        go of the GIL between chunks, so the event loop keeps answering meanwhile."""
        if _typed_bytes_elements(request) > OFFLOAD_ELEMENTS:
            return await asyncio.to_thread(
                decode_infer_request, request, self.dataplane.shared_memory
            )
        return decode_infer_request(request, self.dataplane.shared_memory)

    @_unary
    async def ServerLive(self, request: Any, context: CallContext) -> Any:
        return service_pb2.ServerLiveResponse(live=self.dataplane.live())

    @_unary
    async def ServerReady(self, request: Any, context: CallContext) -> Any:
        return service_pb2.ServerReadyResponse(ready=self.dataplane.ready())

    @_unary
    async def ModelReady(self, request: Any, context: CallContext) -> Any:
        try:
            ready = self.dataplane.model_ready(request.name, request.version)
        except OpserveError:
            ready = False
        return service_pb2.ModelReadyResponse(ready=ready)

    @_unary
    async def ServerMetadata(self, request: Any, context: CallContext) -> Any:
        metadata = self.dataplane.server_metadata()
        return service_pb2.ServerMetadataResponse(
            name=metadata["name"], version=metadata["version"], extensions=metadata["extensions"]
        )

    @_unary
    async def ModelMetadata(self, request: Any, context: CallContext) -> Any:
        metadata = self.dataplane.model_metadata(request.name, request.version)
        response = service_pb2.ModelMetadataResponse(
            name=metadata.name, versions=metadata.versions, platform=metadata.platform
        )
        for kind, tensors in (("inputs", metadata.inputs), ("outputs", metadata.outputs)):
            for tensor in tensors:
                getattr(response, kind).add(
                    name=tensor.name, datatype=tensor.datatype, shape=tensor.shape
                )
        return response

    @_unary
    async def ModelConfig(self, request: Any, context: CallContext) -> Any:
        model, _ = self.dataplane.manager.version(request.name, request.version)
        return service_pb2.ModelConfigResponse(config=model.config)

    @_unary
    async def ModelStatistics(self, request: Any, context: CallContext) -> Any:
        stats = self.dataplane.model_statistics(request.name, request.version)
        return json_format.ParseDict({"model_stats": stats}, service_pb2.ModelStatisticsResponse())

    @_unary
    async def ModelInfer(self, request: Any, context: CallContext) -> Any:
        inference, regions = await self._decode(request)
        if self.forward is not None:
            metadata = context.invocation_metadata() or ()
            inference.parameters.update(forwarded(self.forward, metadata))
        try:
            response = await self.dataplane.infer(inference)
            if regions is None:
                return encode_infer_answer(response)
            regions.place_outputs(response)
            return encode_infer_answer(response, regions.outputs)
        except OpserveError as error:
            raise _infer_error(error) from None
        finally:
            if regions is not None:
                regions.release()

    def ModelInferNow(
        self, message: memoryview | bytes, context: CallContext, done: Callable[[Any], None]
    ) -> bool:
        """`ModelInfer` without a task (`Method.answer_now`), from the message's bytes: decoded
        (from a template when it is like one seen lately, `templates`), validated and queued now;
        `done` gets the response message, or a `CallError`, when the model has answered. False
        for what needs the task: forwarded headers, shared memory, many typed BYTES elements, a
        message protobuf cannot parse (the task's way reports it), or what the dataplane cannot
        start so (`DataPlane.submit`)."""
        if self.forward is not None:
            return False
        inference = self.templates.request(message)
        request = None
        if inference is None:
            try:
                request = service_pb2.ModelInferRequest.FromString(message)
            except Exception:
                return False
            if _typed_bytes_elements(request) > OFFLOAD_ELEMENTS:
                return False
        try:
            if request is not None:
                inference, regions = decode_infer_request(request, self.dataplane.shared_memory)
                if regions is not None:  # leases to release whatever happens: the task's way
                    regions.release()
                    return False
                self.templates.remember(message, request, inference)
            assert inference is not None
            cancel = self.dataplane.submit(inference, lambda outcome: done(_infer_answer(outcome)))
            if cancel is None:
                return False
            context.on_cancel = cancel
            return True
        except Exception as exc:
            done(_call_error(exc))
            return True

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[Any], context: CallContext
    ) -> AsyncIterator[Any]:
        """Requests of one stream run concurrently; each answer (or error) is sent as it is ready.
        Every request gets its answers or one error (`error_message`), whatever its handling
        raised."""
        answers: asyncio.Queue[Any] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()

        async def handle(request: Any) -> None:
            regions = None
            try:
                empty_final = _flag(request, "triton_enable_empty_final_response")
                inference, regions = await self._decode(request)
                if self.forward is not None:
                    metadata = context.invocation_metadata() or ()
                    inference.parameters.update(forwarded(self.forward, metadata))
                async for item, final in self.dataplane.stream(inference):
                    if isinstance(item, OpserveError):
                        await answers.put(_stream_error(request, item))
                    elif item is not None:  # every response says whether it is the last
                        if regions is not None:
                            regions.place_outputs(item)
                        message = encode_infer_response(item, regions.outputs if regions else ())
                        message.parameters["triton_final_response"].bool_param = final
                        await answers.put(
                            service_pb2.ModelStreamInferResponse(infer_response=message)
                        )
                    elif final and empty_final:  # only the flag: an empty final response
                        message = service_pb2.ModelInferResponse(
                            model_name=request.model_name,
                            model_version=request.model_version,
                            id=request.id,
                        )
                        message.parameters["triton_final_response"].bool_param = True
                        await answers.put(
                            service_pb2.ModelStreamInferResponse(infer_response=message)
                        )
            except Exception as exc:
                await answers.put(_stream_error(request, as_opserve_error(exc, "ModelStreamInfer")))
            finally:
                if regions is not None:
                    regions.release()

        async def read() -> None:
            async for request in request_iterator:
                task = asyncio.ensure_future(handle(request))
                running.add(task)
                task.add_done_callback(running.discard)
            await answers.put(None)

        reader = asyncio.ensure_future(read())
        try:
            finished = False
            while not (finished and not running and answers.empty()):
                answer = await answers.get()
                if answer is None:
                    finished = True
                    if running:
                        await asyncio.gather(*running, return_exceptions=True)
                    continue
                yield answer
        finally:
            reader.cancel()
            for task in running:
                task.cancel()

    @_unary
    async def TraceSetting(self, request: Any, context: CallContext) -> Any:
        return await _trace_setting(self.dataplane, request)

    @_unary
    async def LogSettings(self, request: Any, context: CallContext) -> Any:
        return await _log_settings(self.dataplane, request)

    # shared memory (Triton's extension; CUDA answered as Triton answers without GPUs) ------
    @_unary
    async def SystemSharedMemoryStatus(self, request: Any, context: CallContext) -> Any:
        response = service_pb2.SystemSharedMemoryStatusResponse()
        for region in self.dataplane.shared_memory.status(request.name):
            response.regions[region["name"]].CopyFrom(
                service_pb2.SystemSharedMemoryStatusResponse.RegionStatus(**region)
            )
        return response

    @_unary
    async def SystemSharedMemoryRegister(self, request: Any, context: CallContext) -> Any:
        self.dataplane.shared_memory.register(
            request.name, request.key, request.offset, request.byte_size
        )
        return service_pb2.SystemSharedMemoryRegisterResponse()

    @_unary
    async def SystemSharedMemoryUnregister(self, request: Any, context: CallContext) -> Any:
        if request.name:
            self.dataplane.shared_memory.unregister(request.name)
        else:
            self.dataplane.shared_memory.unregister_all()
        return service_pb2.SystemSharedMemoryUnregisterResponse()

    @_unary
    async def CudaSharedMemoryStatus(self, request: Any, context: CallContext) -> Any:
        if request.name:
            if self.dataplane.shared_memory.has(request.name):
                raise NotFoundError(
                    f"The region named '{request.name}' is registered as system shared "
                    "memory, not CUDA shared memory"
                )
            raise NotFoundError(f"Unable to find cuda shared memory region: '{request.name}'")
        return service_pb2.CudaSharedMemoryStatusResponse()

    @_unary
    async def CudaSharedMemoryRegister(self, request: Any, context: CallContext) -> Any:
        raise InvalidArgumentError(
            f"failed to register CUDA shared memory region: '{request.name}', GPUs not supported"
        )

    @_unary
    async def CudaSharedMemoryUnregister(self, request: Any, context: CallContext) -> Any:
        return service_pb2.CudaSharedMemoryUnregisterResponse()  # nothing is ever registered

    @_unary
    async def RepositoryIndex(self, request: Any, context: CallContext) -> Any:
        index = await self.dataplane.repository_index(request.ready)
        response = service_pb2.RepositoryIndexResponse()
        for entry in index:
            response.models.add(**entry)
        return response

    @_unary
    async def RepositoryModelLoad(self, request: Any, context: CallContext) -> Any:
        parameters = {
            key: getattr(value, value.WhichOneof("parameter_choice"))
            for key, value in request.parameters.items()
            if value.WhichOneof("parameter_choice")
        }

        await self.dataplane.load_model(request.model_name, parameters)
        return service_pb2.RepositoryModelLoadResponse()

    @_unary
    async def RepositoryModelUnload(self, request: Any, context: CallContext) -> Any:
        await self.dataplane.unload_model(request.model_name)
        return service_pb2.RepositoryModelUnloadResponse()


async def _trace_setting(dataplane: DataPlane, request: Any) -> Any:
    """gRPC `TraceSetting`: a setting with no values clears a model's own setting."""
    changes: dict[str, Any] = {}
    for key, value in request.settings.items():
        values = list(value.value)
        if not values:
            changes[key] = None
        elif key == "trace_level":
            changes[key] = values
        else:
            changes[key] = values[0]
    model = request.model_name
    if changes:
        settings = dataplane.update_trace_settings(model, changes)
    else:
        settings = dataplane.trace_settings(model)
    response = service_pb2.TraceSettingResponse()
    for key, setting in settings.items():
        response.settings[key].value.extend(setting if isinstance(setting, list) else [setting])
    return response


async def _log_settings(dataplane: DataPlane, request: Any) -> Any:
    """gRPC `LogSettings`: change what the request sets, answer every setting."""
    changes = {}
    for key, value in request.settings.items():
        choice = value.WhichOneof("parameter_choice")
        if choice is not None:
            changes[key] = getattr(value, choice)
    settings = dataplane.update_log_settings(changes) if changes else dataplane.log_settings()
    response = service_pb2.LogSettingsResponse()
    for key, value in settings.items():
        entry = response.settings[key]
        if isinstance(value, bool):
            entry.bool_param = value
        elif isinstance(value, int):
            entry.uint32_param = value
        else:
            entry.string_param = value
    return response


def _flag(request: Any, name: str) -> bool:
    parameter = request.parameters.get(name)
    return (
        parameter is not None
        and parameter.WhichOneof("parameter_choice") == "bool_param"
        and parameter.bool_param
    )


def _stream_error(request: Any, error: OpserveError) -> Any:
    answer = service_pb2.ModelStreamInferResponse(error_message=error.message)
    answer.infer_response.id = request.id
    answer.infer_response.model_name = request.model_name
    return answer


async def start_grpc_server(
    dataplane: DataPlane,
    address: str,
    port: int,
    keepalive: KeepaliveSettings | None = None,
    compression: str = "none",
    tls: tuple[bytes, bytes, bytes | None] | None = None,
    restrictions: dict[str, Restriction] | None = None,
    forward: re.Pattern[str] | None = None,
    reuse_port: bool = False,
    max_input_size: int = GRPC_DEFAULT_MAX_INPUT_SIZE,
    limits: ConnectionLimits | None = None,
) -> GrpcServer:
    """Serve `inference.GRPCInferenceService`. `keepalive` holds Triton's keepalive and
    connection-age flags; `compression` is --grpc-infer-response-compression-level; `tls` is
    (key, certificate, root certificate for client certificates or None), all PEM. A request
    message over `max_input_size` is refused (RESOURCE_EXHAUSTED) before it is read whole;
    `limits` bounds the connections and how long a new one may stay silent."""
    service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    servicer = InferenceServicer(dataplane, forward)
    calls = GrpcCalls(methods_of(servicer, service), compression, restrictions, max_input_size)
    server = GrpcServer(calls, keepalive or KeepaliveSettings(), limits)
    context = None if tls is None else tls_context(*tls)
    bound = await server.start(address, port, context, reuse_port)
    log.info("serving gRPC on %s:%d", address, bound)
    return server
