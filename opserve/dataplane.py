"""The protocol-free core that every frontend calls: health, metadata, config, inference.

Inputs are validated against the model's config here, once, before they reach a worker:
names, datatypes, shapes (with -1 and the implicit batch dimension), `max_batch_size` and the
size of the data.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format

from opserve import __version__
from opserve.classification import classify
from opserve.config import config_to_json
from opserve.datatypes import (
    ITEM_SIZES,
    config_to_v2,
    count_bytes_elements,
    element_count,
    serialize_bytes,
)
from opserve.ensemble_scheduler import EnsembleScheduler
from opserve.errors import (
    InvalidArgumentError,
    OpserveError,
    UnavailableError,
    UnsupportedError,
)
from opserve.inference import InferenceRequest, InferenceResponse, Tensor
from opserve.logs import LogSettings, ServerLog
from opserve.polling import Polling
from opserve.proto import ModelConfig, model_config_pb2
from opserve.repository.manager import Model, ModelManager, ModelState, ModelVersion
from opserve.response_cache import cache_key
from opserve.scheduler import Scheduler
from opserve.schema import ModelSchema
from opserve.sequence_config import FLAG_SEQUENCE_END, FLAG_SEQUENCE_START
from opserve.shared_memory import SharedMemoryRegistry
from opserve.tracing import Tracer

OFFLOAD_BYTES = 1 << 20  # BYTES data larger than this is counted off the event loop

EXTENSIONS = (
    "classification",
    "binary_tensor_data",
    "model_configuration",
    "model_repository",
    "statistics",
    "logging",
    "trace",
    "system_shared_memory",
)


class DecoupledModelError(UnsupportedError):
    """A decoupled model was asked for a single response; each frontend words it its way
    (`as_told_by`)."""


def as_told_by(error: OpserveError, endpoint: str) -> OpserveError:
    """An inference's error as `endpoint` (Triton's name for it) tells it: a decoupled model
    in Triton's words, any other error as it is."""
    if isinstance(error, DecoupledModelError):
        return UnsupportedError(
            f"{endpoint} doesn't support models with decoupled transaction policy"
        )
    return error


@dataclass(frozen=True, slots=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: list[int]


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    op_libraries: list[str]  # resolved paths of the op libraries its worker loaded


class DataPlane:
    def __init__(
        self,
        manager: ModelManager,
        server_id: str = "triton",
        strict_readiness: bool = True,
        log: ServerLog | None = None,
        tracer: Tracer | None = None,
        polling: Polling | None = None,
    ) -> None:
        self.manager = manager
        self.server_id = server_id  # --id: the name in the server metadata, as in Triton
        self.strict_readiness = strict_readiness
        self.log = log or ServerLog(LogSettings())
        self.tracer = tracer or Tracer()
        manager.step_runner = self  # an ensemble's steps are requests through the dataplane
        self.shared_memory = SharedMemoryRegistry()  # regions clients registered
        # the requests in flight, and polling rather than sleeping while there are any
        self.polling = polling or Polling()

    # server ------------------------------------------------------------------------------------
    def server_metadata(self) -> dict[str, Any]:
        return {"name": self.server_id, "version": __version__, "extensions": list(EXTENSIONS)}

    def live(self) -> bool:
        return True

    def log_settings(self) -> dict[str, Any]:
        """The logging extension's settings (`GET /v2/logging`, gRPC `LogSettings`)."""
        return self.log.settings.to_json()

    def trace_settings(self, model: str = "") -> dict[str, Any]:
        """The trace extension's settings, global or of one model."""
        if model:
            self.manager.model(model)  # NOT_FOUND for an unknown model
        return self.tracer.settings(model).to_json()

    def update_trace_settings(self, model: str, changes: dict[str, Any]) -> dict[str, Any]:
        if model:
            self.manager.model(model)
        return self.tracer.update(model, changes).to_json()

    def update_log_settings(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Change the live log settings (all or none of `changes`); the settings after."""
        return self.log.update(changes).to_json()

    def ready(self) -> bool:
        """With strict readiness (Triton's default): once every model that was asked for is
        READY; otherwise whenever the server answers."""
        if not self.strict_readiness:
            return True
        models = self.manager.models.values()
        return all(m.state is ModelState.READY for m in models if not m.unloaded)

    # models ------------------------------------------------------------------------------------
    def model_ready(self, name: str, version: str = "") -> bool:
        self.manager.version(name, version)  # raises with the reason when not ready
        return True

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        model, entry = self.manager.version(name, version)
        schema = self.schema(model)
        batch = [-1] if schema.batching else []
        return ModelMetadata(
            name=model.name,
            versions=[str(v.version) for v in reversed(model.ready_versions())],
            platform=model.config.platform or model.config.backend,
            inputs=[
                TensorMetadata(t.name, t.datatype, batch + list(t.dims))
                for t in schema.inputs.values()
            ],
            outputs=[
                TensorMetadata(t.name, t.datatype, batch + list(t.dims))
                for t in schema.outputs.values()
            ],
            op_libraries=entry.op_libraries,
        )

    def model_config(self, name: str, version: str = "") -> dict[str, Any]:
        model, _ = self.manager.version(name, version)
        return config_to_json(model.config)

    @staticmethod
    def schema(model: Model) -> ModelSchema:
        if model.schema is None:
            raise UnavailableError(f"model '{model.name}' is not ready: {model.reason}")
        return model.schema

    def model_statistics(self, name: str = "", version: str = "") -> list[dict[str, Any]]:
        """Triton's `model_stats`: every loaded version of one model, or of every model."""
        if name:
            model = self.manager.model(name)
            if version:
                self.manager.version(name, version)  # NOT_FOUND / UNAVAILABLE as for inference
                entries = [model.versions[int(version)]]
            else:
                entries = list(model.versions.values())
            selected = [(model, e) for e in entries]
        else:
            selected = [(m, e) for m in self.manager.models.values() for e in m.versions.values()]
        return [
            entry.stats.to_json(model.name, str(entry.version))
            for model, entry in sorted(selected, key=lambda p: (p[0].name, p[1].version))
            if entry.scheduler is not None or entry.stats.execution_count
        ]

    # repository --------------------------------------------------------------------------------
    async def repository_index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """Triton's index polls the repository: remote ones are synced first."""
        await self.manager.refresh()
        return self.manager.index(ready_only)

    async def load_model(self, name: str, parameters: dict[str, Any] | None = None) -> None:
        self._require_explicit()
        config = None
        for key, value in (parameters or {}).items():
            if key == "config":
                config = _config_from_json(name, value)
            elif key.startswith("file:"):
                raise UnsupportedError("loading model files sent with the request is not supported")
        await self.manager.load(name, config)

    async def unload_model(self, name: str) -> None:
        self._require_explicit()
        await self.manager.unload(name)

    def _require_explicit(self) -> None:
        if self.manager.control_mode == "poll":
            raise UnavailableError(
                "explicit model load / unload is not allowed if polling is enabled"
            )
        if self.manager.control_mode != "explicit":
            raise UnavailableError(
                "explicit model load / unload is not allowed if model control mode is not EXPLICIT"
            )

    # inference ---------------------------------------------------------------------------------
    def _prepare(
        self, request: InferenceRequest, streaming: bool, counted: dict[str, int]
    ) -> tuple[Model, ModelVersion, Scheduler | EnsembleScheduler, int]:
        """Find the version, validate the request against its config (inputs reshaped as the
        model wants them, requested outputs checked; `counted`: the elements of large BYTES
        inputs, counted off the event loop)."""
        model, entry = self.manager.version(request.model_name, request.model_version)
        schema = self.schema(model)
        if not streaming and schema.decoupled:
            raise DecoupledModelError(
                f"model '{model.name}' uses the decoupled transaction policy: its responses "
                "must be streamed (gRPC ModelStreamInfer, or HTTP generate_stream)"
            )
        check_request(model, schema, request, counted)
        scheduler = entry.scheduler
        if scheduler is None:
            raise UnavailableError(f"{entry.label} is not ready: {entry.reason}")
        batch_size = request.inputs[0].shape[0] if schema.batching and request.inputs else 1
        return model, entry, scheduler, batch_size

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        """The one response to a request (a decoupled model must be streamed)."""
        self.polling.began()
        try:
            return await self._infer(request)
        finally:
            self.polling.ended()

    async def _infer(self, request: InferenceRequest) -> InferenceResponse:
        counted = await count_large_bytes(request.inputs)
        model, entry, scheduler, batch_size = self._prepare(request, False, counted)
        if self.tracer.active:
            request.trace = self.tracer.sample(model.name, request.id)
        try:
            response = await self._answer(model, entry, scheduler, request, batch_size)
        finally:
            if request.trace is not None:
                self.tracer.finish(request.trace, str(entry.version))
        return self._finish(model, entry, request, response)

    def submit(
        self,
        request: InferenceRequest,
        done: Callable[[InferenceResponse | BaseException], None],
    ) -> Callable[[], None] | None:
        """`infer` without a task of its own, for the frontends' common case: the request is
        validated and started now, and `done` gets its finished response (or the error) later,
        from the event loop. Returns what cancels the request (its client went away: dropped if
        queued, the model told if it runs); None, with the request untouched, when something
        about it needs `infer` (large BYTES inputs to count off the loop, tracing). Raises what
        `infer` raises before the request is queued (not found, invalid, decoupled, full)."""
        if self.tracer.active:
            return None
        for tensor in request.inputs:
            if tensor.datatype == "BYTES" and len(tensor.data) > OFFLOAD_BYTES:
                return None
        model, entry, scheduler, batch_size = self._prepare(request, False, {})
        future: asyncio.Future[InferenceResponse]
        cache = self.manager.response_cache
        cached = cache is not None and model.config.response_cache.enable
        pending = None
        if isinstance(scheduler, Scheduler) and not cached:
            pending = scheduler.submit(request, batch_size, request.on_wait)
        cancel: Callable[[], Any]
        if pending is not None:
            assert pending.future is not None
            future, cancel = pending.future, pending.cancel
        elif isinstance(scheduler, EnsembleScheduler) and not cached:
            future, cancel = scheduler.submit(request, batch_size)
        else:  # waits for an instance or looks in the cache: a task of its own
            future = asyncio.ensure_future(
                self._answer(model, entry, scheduler, request, batch_size)
            )
            cancel = future.cancel

        def finished(future: asyncio.Future[InferenceResponse]) -> None:
            self.polling.ended()
            if future.cancelled():
                done(asyncio.CancelledError())
            elif (error := future.exception()) is not None:
                done(error)
            else:
                try:
                    response = self._finish(model, entry, request, future.result())
                except Exception as exc:  # `done` answers every error, a bug's too
                    done(exc)
                    return
                done(response)

        future.add_done_callback(finished)
        self.polling.began()

        def cancelled() -> None:  # the client went away
            if not future.done():
                cancel()

        return cancelled

    async def _answer(
        self,
        model: Model,
        entry: ModelVersion,
        scheduler: Scheduler | EnsembleScheduler,
        request: InferenceRequest,
        batch_size: int,
    ) -> InferenceResponse:
        """The model's one response: from the response cache when the model uses it and holds
        it, else from the scheduler (and then kept in the cache)."""
        cache = self.manager.response_cache
        if cache is None or not model.config.response_cache.enable:
            return await scheduler.infer(request, batch_size, request.on_wait)
        started = time.monotonic_ns()
        key = cache_key(request, model.name, entry.version)
        cached = cache.get(key)
        if cached is not None:
            entry.stats.record_cache_hit(time.monotonic_ns() - started)
            return cached
        lookup_ns = time.monotonic_ns() - started
        response = await scheduler.infer(request, batch_size, request.on_wait)
        started = time.monotonic_ns()
        cache.put(key, response)
        entry.stats.record_cache_miss(lookup_ns + time.monotonic_ns() - started)
        return response

    async def stream(
        self, request: InferenceRequest
    ) -> AsyncIterator[tuple[InferenceResponse | OpserveError | None, bool]]:
        """Every response to a request, the last flagged final: one for most models, any
        number (even none: only the final flag) for a decoupled one. Errors after the request
        was accepted come as items; a request that is refused raises."""
        self.polling.began()
        try:
            # closed with this generator, so that its own `finally` runs then, not when collected
            async with contextlib.aclosing(self._stream(request)) as items:
                async for item in items:
                    yield item
        finally:
            self.polling.ended()

    async def _stream(
        self, request: InferenceRequest
    ) -> AsyncGenerator[tuple[InferenceResponse | OpserveError | None, bool], None]:
        counted = await count_large_bytes(request.inputs)
        model, entry, scheduler, batch_size = self._prepare(request, True, counted)
        if self.tracer.active:
            request.trace = self.tracer.sample(model.name, request.id)
        try:
            if not scheduler.decoupled:
                try:
                    response = await self._answer(model, entry, scheduler, request, batch_size)
                except OpserveError as exc:
                    yield exc, True
                    return
                yield self._finish(model, entry, request, response), True
                return
            async for item, final in scheduler.stream(request, batch_size):
                if isinstance(item, InferenceResponse):
                    item = self._finish(model, entry, request, item)
                yield item, final
        finally:
            if request.trace is not None:
                self.tracer.finish(request.trace, str(entry.version))

    def _finish(
        self,
        model: Model,
        entry: ModelVersion,
        request: InferenceRequest,
        response: InferenceResponse,
    ) -> InferenceResponse:
        response.model_name = model.name
        response.model_version = str(entry.version)
        response.id = request.id
        schema = model.schema or self.schema(model)  # the call only to raise when it is gone
        if schema.reshaped_outputs:
            response.outputs = _client_shapes(schema, response.outputs)
        if request.classification:
            response.outputs = [
                classify(t, count, schema.batching, model.labels.get(t.name, []))
                if (count := request.classification.get(t.name))
                else t
                for t in response.outputs
            ]
        return response


def _natural(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidArgumentError(f"the '{name}' parameter must be a non-negative integer")
    return value


def _config_from_json(name: str, value: Any) -> ModelConfig:
    """The `config` parameter of a load request: a ModelConfig in JSON, as Triton takes it."""
    if not isinstance(value, str):
        raise InvalidArgumentError("the 'config' parameter must be a string holding JSON")
    config = ModelConfig()
    try:
        json_format.Parse(value, config)
    except json_format.ParseError as exc:
        raise InvalidArgumentError(f"failed to parse the config of model '{name}': {exc}") from None
    return config


async def count_large_bytes(inputs: list[Tensor]) -> dict[str, int]:
    """The element counts of BYTES inputs over `OFFLOAD_BYTES`, by name. Counting walks the
    elements one by one in Python, so it runs in a thread: the walk lets go of the GIL between
    its steps and the event loop keeps answering (health probes, other requests) meanwhile."""
    large = [t for t in inputs if t.datatype == "BYTES" and len(t.data) > OFFLOAD_BYTES]
    if not large:
        return {}
    return await asyncio.to_thread(lambda: {t.name: count_bytes_elements(t.data) for t in large})


def check_request(
    model: Model, schema: ModelSchema, request: InferenceRequest, counted: dict[str, int]
) -> None:
    """Check a request against its model's config: its inputs (reshaped as the model wants
    them), server parameters and requested outputs. A request whose signature passed once is
    trusted (`ModelSchema.validated`): only its inputs' shapes are set and its server
    parameters taken; one that passes is remembered so, unless it holds BYTES, whose element
    counts its data decide. `counted`: element counts of BYTES inputs already taken."""
    signature = request.signature
    if signature is not None and signature in schema.validated:
        shapes = schema.validated[signature]
        if shapes is not None:
            request.inputs = [
                Tensor(t.name, t.datatype, shape, t.data)
                for t, shape in zip(request.inputs, shapes, strict=True)
            ]
        if request.parameters:
            take_server_parameters(request)
        return
    given = request.inputs
    if request.raw_input:
        request.inputs = deduce_raw_input(model.name, model.config, request.inputs)
    request.inputs = validate_inputs(model.name, schema, request, counted)
    if request.parameters:
        take_server_parameters(request)
    if request.requested_outputs is not None:
        if len(set(request.requested_outputs)) != len(request.requested_outputs):
            twice = next(
                n for n in request.requested_outputs if request.requested_outputs.count(n) > 1
            )
            raise InvalidArgumentError(  # Triton's words
                f"output '{twice}' already exists in request for model '{model.name}'"
            )
        for name in request.requested_outputs:
            if name not in schema.outputs:
                raise InvalidArgumentError(
                    f"unexpected inference output '{name}' for model '{model.name}'"
                )
    if signature is not None and not request.raw_input:
        prepared = request.inputs
        if all(t.datatype != "BYTES" for t in prepared):
            reshaped = any(a.shape != b.shape for a, b in zip(given, prepared, strict=True))
            schema.remember_valid(signature, tuple(t.shape for t in prepared) if reshaped else None)


def validate_inputs(
    model_name: str,
    schema: ModelSchema,
    request: InferenceRequest,
    counted: dict[str, int] | None = None,
) -> list[Tensor]:
    """Check every input against the config; the tensors to send, reshaped as the model wants.
    `counted`: element counts of BYTES inputs already taken (`count_large_bytes`)."""
    seen: set[str] = set()
    batch_size = None
    prepared: list[Tensor] = []
    for tensor in request.inputs:
        spec = schema.inputs.get(tensor.name)
        if spec is None:
            raise InvalidArgumentError(
                f"unexpected inference input '{tensor.name}' for model '{model_name}'"
            )
        if tensor.name in seen:  # Triton's words
            raise InvalidArgumentError(
                f"input '{tensor.name}' already exists in request for model '{model_name}'"
            )
        seen.add(tensor.name)
        if tensor.datatype != spec.datatype:
            raise InvalidArgumentError(
                f"inference input '{tensor.name}' data-type is '{tensor.datatype}', but model "
                f"'{model_name}' expects '{spec.datatype}'"
            )
        shape = tensor.shape
        if any(d < 0 for d in shape):
            raise InvalidArgumentError(
                f"input '{tensor.name}' has a negative dimension: {list(shape)}"
            )
        dims = shape[1:] if schema.batching else shape
        if (schema.batching and not shape) or not spec.shape_matches(dims):
            raise InvalidArgumentError(
                f"unexpected shape for input '{tensor.name}' for model '{model_name}'. "
                f"Expected {schema.expected_shape(spec)}, got [{','.join(map(str, shape))}]"
            )
        if schema.batching:
            if batch_size is None:
                batch_size = shape[0]
            elif shape[0] != batch_size:
                raise InvalidArgumentError(
                    f"input '{tensor.name}' batch size {shape[0]} does not match the batch size "
                    f"{batch_size} of the other inputs for model '{model_name}'"
                )
            if shape[0] > schema.max_batch_size:
                raise InvalidArgumentError(
                    f"inference request batch-size must be <= {schema.max_batch_size} for "
                    f"'{model_name}'"
                )
            if shape[0] < 1:
                raise InvalidArgumentError(
                    f"inference request batch-size must be >= 1 for '{model_name}'"
                )
        count = element_count(shape)
        if spec.datatype == "BYTES":
            got = counted.get(tensor.name) if counted else None
            if got is None:
                got = count_bytes_elements(tensor.data)
            if got != count:
                raise InvalidArgumentError(
                    f"input '{tensor.name}' holds {got} BYTES elements, but its shape "
                    f"[{','.join(map(str, shape))}] needs {count}"
                )
        else:
            expected = count * ITEM_SIZES[spec.datatype]
            if len(tensor.data) != expected:
                raise InvalidArgumentError(
                    f"unexpected total byte size {len(tensor.data)} for input '{tensor.name}', "
                    f"expecting {expected}"
                )
        if spec.reshape is not None:
            batch = shape[:1] if schema.batching else ()
            tensor = Tensor(tensor.name, tensor.datatype, batch + spec.reshape, tensor.data)
        prepared.append(tensor)
    missing = schema.required_inputs - seen
    if missing:
        raise InvalidArgumentError(
            f"expected {len(schema.required_inputs)} inputs but got {len(seen)} inputs for model "
            f"'{model_name}'. Missing required input(s): {sorted(missing)}"
        )
    return prepared


def deduce_raw_input(model_name: str, config: ModelConfig, inputs: list[Tensor]) -> list[Tensor]:
    """A raw binary request's one tensor as the model's one input: its datatype from the config,
    its shape from the config's dims and the data's size (batch 1 for a batching model). Triton's
    rules and words (core `InferenceRequest::Normalize`)."""
    if len(inputs) != 1 or len(config.input) != 1:
        raise InvalidArgumentError(
            f"Raw request must only have 1 input (found {len(inputs)}) to be deduced but got "
            f"{len(config.input)} inputs in '{model_name}' model configuration"
        )
    spec = config.input[0]
    datatype = config_to_v2(model_config_pb2.DataType.Name(spec.data_type))
    shape = [1] if config.max_batch_size > 0 else []
    variable: int | None = None
    fixed = 1
    for dim in spec.dims:
        if dim == -1:
            if variable is not None:
                raise InvalidArgumentError(
                    f"The shape of the raw input '{spec.name}' can not be deduced because there "
                    "are more than one variable-sized dimension"
                )
            variable = len(shape)
        else:
            fixed *= dim
        shape.append(dim)
    data = inputs[0].data
    if datatype == "BYTES":
        if variable is not None or fixed != 1:
            raise InvalidArgumentError(
                f"For BYTE datatype raw input '{spec.name}', the model must have input shape [1]"
            )
        data = serialize_bytes([bytes(data)])
    elif variable is not None:
        shape[variable] = len(data) // max(fixed * ITEM_SIZES[datatype], 1)
    return [Tensor(spec.name, datatype, tuple(shape), data)]


def take_server_parameters(request: InferenceRequest) -> None:
    """The parameters that are the server's business, as in Triton (not passed on to the
    model): `timeout`, `priority` and the sequence parameters."""
    parameters = request.parameters
    if "timeout" in parameters:
        request.timeout_us = _natural(parameters.pop("timeout"), "timeout")
    if "priority" in parameters:
        request.priority = _natural(parameters.pop("priority"), "priority")
    take_sequence_parameters(request)


def take_sequence_parameters(request: InferenceRequest) -> None:
    """`sequence_id` (an unsigned integer or a string), `sequence_start` and `sequence_end`
    become the request's correlation id and flags, as Triton's frontends do for any model."""
    parameters = request.parameters
    if "sequence_id" in parameters:
        value = parameters.pop("sequence_id")
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise InvalidArgumentError("Unable to parse 'sequence_id'")
        request.correlation_id = value % 2**64 if isinstance(value, int) else value
    for name, flag in (
        ("sequence_start", FLAG_SEQUENCE_START),
        ("sequence_end", FLAG_SEQUENCE_END),
    ):
        if name in parameters:
            value = parameters.pop(name)
            if not isinstance(value, bool):
                raise InvalidArgumentError(f"Unable to parse '{name}'")
            if value:
                request.flags |= flag


def _client_shapes(schema: ModelSchema, outputs: list[Tensor]) -> list[Tensor]:
    """Undo an output `reshape`: the client sees the config's dims."""
    for i, tensor in enumerate(outputs):
        spec = schema.outputs.get(tensor.name)
        if spec is not None and spec.reshape is not None:
            batch = tensor.shape[:1] if schema.batching else ()
            if -1 not in spec.dims:
                outputs[i] = Tensor(tensor.name, tensor.datatype, batch + spec.dims, tensor.data)
    return outputs
