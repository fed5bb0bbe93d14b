"""`triton_python_backend_utils` as a Triton `model.py` imports it, inside an opserve worker.

The names and behaviour follow Triton's Python backend (its `triton_python_backend_utils.py` and
the classes its stub binds in C++). What needs the server (BLS, logging, custom metrics,
decoupled responses) goes through the worker's `ModelServices`, installed by the Python backend.
Only the standard library and numpy are imported (PyTorch only for DLPack, when present), so a
model may run under an interpreter of its own environment.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np

from opserve.backends.base import ModelServices, Reply, Request
from opserve.datatypes import deserialize_bytes, numpy_to_v2
from opserve.errors import ErrorCode, OpserveError, error_from_code
from opserve.workers.messages import WireRequest

TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_START = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_END = 2
TRITONSERVER_REQUEST_RELEASE_ALL = 1
TRITONSERVER_REQUEST_RELEASE_RESCHEDULE = 2

_services: ModelServices | None = None  # set by the Python backend when the model loads
_model_name = ""
_model_dir = ""


def _install(services: ModelServices | None, model_name: str, model_dir: str = "") -> None:
    global _services, _model_name, _model_dir
    _services, _model_name, _model_dir = services, model_name, model_dir


def _require_services() -> ModelServices:
    if _services is None:
        raise TritonModelException("this call needs a running server (it is not available here)")
    return _services


# errors ------------------------------------------------------------------------------------------
class TritonError:
    """An error a model puts in a response (`InferenceResponse(error=...)`)."""

    UNKNOWN = 0
    INTERNAL = 1
    NOT_FOUND = 2
    INVALID_ARG = 3
    UNAVAILABLE = 4
    UNSUPPORTED = 5
    ALREADY_EXISTS = 6
    CANCELLED = 7

    _CODES = {
        UNKNOWN: ErrorCode.UNKNOWN,
        INTERNAL: ErrorCode.INTERNAL,
        NOT_FOUND: ErrorCode.NOT_FOUND,
        INVALID_ARG: ErrorCode.INVALID_ARG,
        UNAVAILABLE: ErrorCode.UNAVAILABLE,
        UNSUPPORTED: ErrorCode.UNSUPPORTED,
        ALREADY_EXISTS: ErrorCode.ALREADY_EXISTS,
        CANCELLED: ErrorCode.CANCELLED,
    }

    def __init__(self, message: str, code: int = INTERNAL) -> None:
        self._message = str(message)
        self._code = code if code in self._CODES else self.INTERNAL

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code

    def __repr__(self) -> str:
        return f"TritonError({self._message!r}, code={self._code})"

    def _to_opserve(self) -> OpserveError:
        return error_from_code(self._CODES[self._code].value, self._message)

    @classmethod
    def _from_opserve(cls, error: OpserveError) -> TritonError:
        code = next((k for k, v in cls._CODES.items() if v is error.code), cls.INTERNAL)
        return cls(error.message, code)


class TritonModelException(Exception):
    """Raised by pb_utils calls that fail (Triton's name)."""

    def message(self) -> str:
        return str(self)


# tensors -----------------------------------------------------------------------------------------
class Tensor:
    """A named tensor on the CPU: numpy arrays (BYTES as object arrays of `bytes`)."""

    def __init__(self, name: str, tensor: Any, datatype: str | None = None) -> None:
        if not name:
            raise TritonModelException("Tensor name cannot be an empty string.")
        if not isinstance(tensor, np.ndarray):
            raise TritonModelException(
                f"Tensor '{name}' must be made from a numpy array, not {type(tensor).__name__}"
            )
        self._name = name
        if tensor.dtype.kind in ("U", "S"):
            tensor = tensor.astype(np.object_)
        elif tensor.dtype.byteorder == ">":  # the same values, in the order the wire has
            tensor = tensor.astype(tensor.dtype.newbyteorder("="))
        self._array = tensor
        try:
            self._datatype = datatype or numpy_to_v2(tensor.dtype)
        except OpserveError as exc:  # complex, datetime, structured: the model's mistake
            raise TritonModelException(f"Tensor '{name}': {exc.message}") from None

    @classmethod
    def _received(cls, name: str, array: np.ndarray) -> Tensor:
        """An input the worker received (a named array the server checked)."""
        tensor = cls.__new__(cls)
        tensor._name = name
        tensor._array = array
        tensor._datatype = numpy_to_v2(array.dtype)
        return tensor

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array

    def shape(self) -> list[int]:
        return list(self._array.shape)

    def triton_dtype(self) -> int:
        """Triton's numeric data type code (TRITONSERVER_DataType), e.g. 11 for FP32."""
        return _V2_CODES.get(self._datatype, 0)

    def is_cpu(self) -> bool:
        return True

    def to_dlpack(self) -> Any:
        if self._array.dtype == np.object_:
            raise TritonModelException("DLPack does not have support for string tensors.")
        array = self._array if self._array.flags.writeable else self._array.copy()
        return array.__dlpack__()

    def __dlpack__(self, stream: Any = None) -> Any:
        return self.to_dlpack()

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)  # kDLCPU

    @classmethod
    def from_dlpack(cls, name: str, capsule: Any) -> Tensor:
        """A tensor from a DLPack capsule or any object with `__dlpack__` (a torch tensor)."""
        try:
            array = np.from_dlpack(capsule)
        except (TypeError, AttributeError, RuntimeError, BufferError):
            try:
                import torch.utils.dlpack as torch_dlpack  # only for a bare capsule

                array = torch_dlpack.from_dlpack(capsule).cpu().numpy()
            except Exception as exc:
                raise TritonModelException(
                    f"cannot make tensor '{name}' from DLPack: {exc}"
                ) from None
        return cls(name, array)

    def __repr__(self) -> str:
        return f"Tensor({self._name!r}, {self._datatype}, {self.shape()})"


# requests and responses --------------------------------------------------------------------------
class InferenceResponse:
    def __init__(
        self,
        output_tensors: list[Tensor] | None = None,
        error: TritonError | None = None,
        parameters: dict[str, Any] | str | None = None,
    ) -> None:
        self._outputs = list(output_tensors or [])
        for tensor in self._outputs:
            if not isinstance(tensor, Tensor):
                raise TritonModelException(
                    "InferenceResponse outputs must be pb_utils.Tensor objects, not "
                    f"{type(tensor).__name__}"
                )
        if error is not None and not isinstance(error, TritonError):
            raise TritonModelException(
                f"InferenceResponse error must be a pb_utils.TritonError, not {type(error).__name__}"
            )
        self._error = error
        self._parameters = _parameters_dict(parameters)

    def output_tensors(self) -> list[Tensor]:
        return self._outputs

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error

    def parameters(self) -> str:
        return _json(self._parameters)

    def _to_reply(self, requested: list[str] | None) -> Reply:
        if self._error is not None:
            return Reply(error=self._error._to_opserve(), parameters=self._parameters)
        outputs = {
            t.name(): t.as_numpy()
            for t in self._outputs
            if requested is None or t.name() in requested
        }
        return Reply(outputs, None, self._parameters)

    @classmethod
    def _from_reply(cls, reply: Reply) -> InferenceResponse:
        if reply.error is not None:
            return cls(error=TritonError._from_opserve(reply.error))
        outputs = [Tensor(n, a) for n, a in (reply.outputs or {}).items()]
        return cls(outputs, parameters=reply.parameters)


class InferenceResponseSender:
    """A decoupled model's way to answer a request, from any thread, after `execute` too."""

    def __init__(self, request: Request, decoupled: bool = True) -> None:
        self._request = request
        self._decoupled = decoupled  # else: one response, as Triton's sender allows
        self._sent = 0
        self._closed = False
        self._lock = threading.Lock()

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        final = bool(flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        if response is None and not final:
            raise TritonModelException(
                "a response sender needs a response, or the flag TRITONSERVER_RESPONSE_COMPLETE_FINAL"
            )
        if response is not None and not isinstance(response, InferenceResponse):
            raise TritonModelException(
                f"send() takes a pb_utils.InferenceResponse, not {type(response).__name__}"
            )
        with self._lock:
            if not self._decoupled:  # Triton's rules and words, checked before `closed`
                if response is not None and self._sent:
                    raise TritonModelException(
                        "Unable to send response. Non-decoupled model cannot send more than "
                        "one response."
                    )
                if response is None and not self._sent:
                    raise TritonModelException(
                        "Unable to send response. Non-decoupled model cannot send complete "
                        "final before sending a response."
                    )
            if self._closed:
                raise TritonModelException(
                    "Unable to send response. Response sender has been closed."
                )
            self._sent += response is not None
            if final:
                self._closed = True
        reply = response._to_reply(self._request.outputs) if response is not None else None
        try:
            _require_services().respond(self._request, reply, final)
        except OpserveError as exc:
            raise TritonModelException(exc.message) from None

    def is_cancelled(self) -> bool:
        if not self._request.cancelled and _services is not None:
            _services.poll()
        return self._request.cancelled


class InferenceRequest:
    """A request the model received, or one it makes of another model (BLS)."""

    def __init__(
        self,
        model_name: str = "",
        inputs: list[Tensor] | None = None,
        requested_output_names: list[str] | None = None,
        request_id: str = "",
        correlation_id: int | str = 0,
        flags: int = 0,
        timeout: int = 0,
        model_version: int = -1,
        parameters: dict[str, Any] | str | None = None,
        preferred_memory: Any = None,
        trace: Any = None,
    ) -> None:
        self._model_name = model_name
        self._inputs = list(inputs or [])
        for tensor in self._inputs:
            if not isinstance(tensor, Tensor):
                raise TritonModelException(
                    f"InferenceRequest inputs must be pb_utils.Tensor objects, not {type(tensor).__name__}"
                )
        self._requested = list(requested_output_names or [])
        self._request_id = request_id
        self._correlation_id = correlation_id
        self._flags = flags
        self._timeout = timeout
        self._model_version = model_version
        self._parameters = _parameters_dict(parameters)
        self._received: Request | None = None
        self._decoupled = False
        self._sender: InferenceResponseSender | None = None

    @classmethod
    def _from_received(
        cls, request: Request, model_name: str, outputs: list[str], decoupled: bool = False
    ) -> InferenceRequest:
        # what the server sent was checked there: set as it is, without `__init__`'s checks
        made = cls.__new__(cls)
        made._model_name = model_name
        made._inputs = [Tensor._received(n, a) for n, a in request.inputs.items()]
        made._requested = list(request.outputs) if request.outputs is not None else outputs
        made._request_id = request.id
        made._correlation_id = request.correlation_id
        made._flags = request.flags
        made._timeout = request.timeout_us
        made._model_version = -1
        made._parameters = dict(request.parameters) if request.parameters else {}
        made._received = request
        made._decoupled = decoupled
        made._sender = None
        return made

    # what a received request offers -----------------------------------------------------------
    def inputs(self) -> list[Tensor]:
        return self._inputs

    def model_name(self) -> str:
        return self._model_name

    def request_id(self) -> str:
        return self._request_id

    def correlation_id(self) -> int | str:
        return self._correlation_id

    def flags(self) -> int:
        return self._flags

    def timeout(self) -> int:
        return self._timeout

    def parameters(self) -> str:
        """The request's parameters as a compact JSON string (as Triton gives them)."""
        return _json(self._parameters)

    def requested_output_names(self) -> Any:
        """A received request's: the set of outputs the client asked for (all of the model's
        when it named none), as Triton gives them; a BLS request's: the list it was made with."""
        if self._received is not None:
            return set(self._requested)
        return self._requested

    def get_response_sender(self) -> InferenceResponseSender:
        if self._received is None:
            raise TritonModelException("only a request the model received has a response sender")
        if self._sender is None:
            self._sender = InferenceResponseSender(self._received, self._decoupled)
        return self._sender

    def is_cancelled(self) -> bool:
        if self._received is None:
            return False
        if not self._received.cancelled and _services is not None:
            _services.poll()
        return self._received.cancelled

    def set_release_flags(self, flags: int) -> None:
        if flags & TRITONSERVER_REQUEST_RELEASE_RESCHEDULE:
            raise TritonModelException("request rescheduling is not supported by this server")

    # BLS -------------------------------------------------------------------------------------
    def _replies(self, decoupled: bool) -> Iterator[Reply]:
        if not self._model_name:
            raise TritonModelException("a BLS request needs a model_name")
        wire = WireRequest(
            self._request_id,
            [],
            self._requested or None,
            self._parameters,
            self._correlation_id,
            self._flags,
            self._model_name,
            "" if self._model_version in (-1, None) else str(self._model_version),
        )
        inputs = {t.name(): t.as_numpy() for t in self._inputs}
        return _require_services().infer(wire, inputs, decoupled, self._timeout)

    def exec(self, decoupled: bool = False) -> Any:
        """Run the request on the server: one `InferenceResponse`, or with `decoupled=True`
        an iterator of every response (the last one may be empty, flagged final)."""
        replies = self._replies(decoupled)
        if decoupled:
            return _ResponseIterator(replies)
        reply = next(iter(replies))
        for _ in replies:  # the final flag
            pass
        return InferenceResponse._from_reply(reply)

    async def async_exec(self, decoupled: bool = False) -> Any:
        loop = asyncio.get_running_loop()
        if decoupled:
            replies = await loop.run_in_executor(None, self._replies, True)
            return _AsyncResponseIterator(replies)
        return await loop.run_in_executor(None, self.exec, False)

    def __repr__(self) -> str:
        return f"InferenceRequest(model_name={self._model_name!r}, id={self._request_id!r})"


class _ResponseIterator:
    """The responses of a decoupled BLS call, as they come."""

    def __init__(self, replies: Iterator[Reply]) -> None:
        self._replies = replies

    def __iter__(self) -> _ResponseIterator:
        return self

    def __next__(self) -> InferenceResponse:
        return InferenceResponse._from_reply(next(self._replies))

    def cancel(self) -> None:
        """Stop reading (the server finishes the call on its own)."""


class _AsyncResponseIterator:
    def __init__(self, replies: Iterator[Reply]) -> None:
        self._replies = replies

    def __aiter__(self) -> AsyncIterator[InferenceResponse]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[InferenceResponse]:
        loop = asyncio.get_running_loop()
        done = object()
        while True:
            reply = await loop.run_in_executor(None, next, self._replies, done)
            if reply is done:
                return
            yield InferenceResponse._from_reply(reply)  # type: ignore[arg-type]


def _json(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"))


def _parameters_dict(parameters: dict[str, Any] | str | None) -> dict[str, Any]:
    if parameters is None or (not parameters and isinstance(parameters, (dict, str))):
        return {}  # the common case, on every request and response
    if isinstance(parameters, str):
        try:
            parameters = json.loads(parameters) if parameters else {}
        except json.JSONDecodeError as exc:
            raise TritonModelException(f"parameters must be a JSON object: {exc}") from None
    if not isinstance(parameters, dict):
        raise TritonModelException("parameters must be a dict (or a JSON object string)")
    for key, value in parameters.items():
        if not isinstance(key, str) or not isinstance(value, (bool, int, float, str)):
            raise TritonModelException(
                "parameters map strings to bool, int, float or str values; "
                f"'{key}' holds {type(value).__name__}"
            )
    return dict(parameters)


# module-level helpers, as in Triton's triton_python_backend_utils.py ------------------------------
def get_input_tensor_by_name(inference_request: InferenceRequest, name: str) -> Tensor | None:
    for tensor in inference_request.inputs():
        if tensor.name() == name:
            return tensor
    return None


def get_output_tensor_by_name(inference_response: InferenceResponse, name: str) -> Tensor | None:
    for tensor in inference_response.output_tensors():
        if tensor.name() == name:
            return tensor
    return None


def get_input_config_by_name(model_config: dict[str, Any], name: str) -> dict[str, Any] | None:
    for tensor in model_config.get("input", []):
        if tensor.get("name") == name:
            return tensor
    return None


def get_output_config_by_name(model_config: dict[str, Any], name: str) -> dict[str, Any] | None:
    for tensor in model_config.get("output", []):
        if tensor.get("name") == name:
            return tensor
    return None


_TRITON_TO_NUMPY: dict[str, Any] = {
    "TYPE_BOOL": np.bool_,
    "TYPE_UINT8": np.uint8,
    "TYPE_UINT16": np.uint16,
    "TYPE_UINT32": np.uint32,
    "TYPE_UINT64": np.uint64,
    "TYPE_INT8": np.int8,
    "TYPE_INT16": np.int16,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_FP16": np.float16,
    "TYPE_FP32": np.float32,
    "TYPE_FP64": np.float64,
    "TYPE_STRING": np.object_,
}
_V2_CODES = {
    "BOOL": 1,
    "UINT8": 2,
    "UINT16": 3,
    "UINT32": 4,
    "UINT64": 5,
    "INT8": 6,
    "INT16": 7,
    "INT32": 8,
    "INT64": 9,
    "FP16": 10,
    "FP32": 11,
    "FP64": 12,
    "BYTES": 13,
    "BF16": 14,
}
# Triton's numeric data type codes (TRITONSERVER_DataType)
_TYPE_CODES = {
    1: np.bool_,
    2: np.uint8,
    3: np.uint16,
    4: np.uint32,
    5: np.uint64,
    6: np.int8,
    7: np.int16,
    8: np.int32,
    9: np.int64,
    10: np.float16,
    11: np.float32,
    12: np.float64,
    13: np.object_,
}


def triton_string_to_numpy(triton_type_string: str) -> Any:
    return _TRITON_TO_NUMPY[triton_type_string]


def numpy_to_triton_string(data_type: Any) -> str | None:
    """The config's type name of a numpy dtype: `TYPE_FP32`, `TYPE_STRING`, ..."""
    dtype = np.dtype(data_type)
    if dtype.kind in ("O", "S", "U"):
        return "TYPE_STRING"
    for name, candidate in _TRITON_TO_NUMPY.items():
        if candidate is not np.object_ and np.dtype(candidate) == dtype:
            return name
    return None


def triton_to_numpy_type(data_type: int) -> Any:
    return _TYPE_CODES.get(data_type)


def numpy_to_triton_type(data_type: Any) -> int | None:
    dtype = np.dtype(data_type)
    if dtype.kind in ("O", "S", "U"):
        return 13
    for code, candidate in _TYPE_CODES.items():
        if candidate is not np.object_ and np.dtype(candidate) == dtype:
            return code
    return None


def serialize_byte_tensor(input_tensor: np.ndarray) -> Any:
    """Triton's length-prefixed layout of a BYTES array, as `bytes` (`()` when empty, None for
    other dtypes), as Triton's own helper returns it."""
    if input_tensor.size == 0:
        return ()
    if input_tensor.dtype != np.object_ and input_tensor.dtype.type != np.bytes_:
        return None
    parts = []
    for element in input_tensor.reshape(-1, order="C"):
        data = element if isinstance(element, bytes) else str(element).encode("utf-8")
        parts.append(struct.pack("<I", len(data)) + data)
    return b"".join(parts)


def deserialize_bytes_tensor(encoded_tensor: bytes) -> np.ndarray:
    return np.array(deserialize_bytes(encoded_tensor), dtype=np.object_)


# auto-complete -----------------------------------------------------------------------------------
class ModelConfig:
    """The config handed to `auto_complete_config`, in Triton's JSON form, with its helpers
    (the rules and messages of Triton's own)."""

    def __init__(self, model_config: dict[str, Any] | str) -> None:
        self._model_config = (
            json.loads(model_config) if isinstance(model_config, str) else model_config
        )

    @property
    def _name(self) -> str:
        return str(self._model_config.get("name", ""))

    def as_dict(self) -> dict[str, Any]:
        return self._model_config

    def set_max_batch_size(self, max_batch_size: int) -> None:
        current = self._model_config.get("max_batch_size", 0)
        if current > max_batch_size:
            raise ValueError(
                "configuration specified max_batch_size " + str(current) + ", but in "
                "auto-complete-config function for model '" + self._name + "' specified "
                "max_batch_size " + str(max_batch_size)
            )
        self._model_config["max_batch_size"] = max_batch_size

    def set_dynamic_batching(self) -> None:
        for found in ("sequence_batching", "ensemble_scheduling"):
            if self._model_config.get(found):
                raise ValueError(
                    "Configuration specified scheduling_choice as '" + found + "', but "
                    "auto-complete-config function for model '" + self._name + "' tries to "
                    "set scheduling_choice as 'dynamic_batching'"
                )
        if "dynamic_batching" not in self._model_config:
            self._model_config["dynamic_batching"] = {}

    def _add_tensor(self, kind: str, tensor: dict[str, Any], allowed: tuple[str, ...]) -> None:
        if not isinstance(tensor, dict):
            raise ValueError(f"model {kind} must be a dict")
        name = tensor.get("name")
        if any(key not in allowed for key in tensor):
            described = ", ".join(f"'{k}'" for k in allowed[:-1]) + f" and '{allowed[-1]}'"
            raise ValueError(
                f"{kind} '{name}' in auto-complete-config function for model "
                f"'{self._name}' contains property other than {described}."
            )
        if "name" not in tensor:
            raise ValueError(
                f"{kind} in auto-complete-config function for model '{self._name}' is missing "
                "'name' property."
            )
        for required in ("data_type", "dims"):
            if required not in tensor:
                raise ValueError(
                    f"{kind} '{name}' in auto-complete-config function for model "
                    f"'{self._name}' is missing '{required}' property."
                )
        tensors = self._model_config.setdefault(kind, [])
        for current in tensors:
            if current.get("name") != name:
                continue
            current_type = current.get("data_type", "TYPE_INVALID")
            if current_type not in ("TYPE_INVALID", tensor["data_type"]):
                raise ValueError(
                    f"unable to load model '{self._name}', configuration expects datatype "
                    f"{current_type} for {kind} '{name}', model provides {tensor['data_type']}"
                )
            if current.get("dims") and list(current["dims"]) != list(tensor["dims"]):
                raise ValueError(
                    f"model '{self._name}', tensor '{name}': the model expects dims "
                    f"{tensor['dims']} but the model configuration specifies dims "
                    f"{current['dims']}"
                )
            if "optional" in tensor and current.get("optional", False) != tensor["optional"]:
                raise ValueError(
                    f"model '{self._name}', tensor '{name}': the model expects optional "
                    f"{tensor['optional']} but the model configuration specifies optional "
                    f"{current.get('optional', False)}"
                )
            current.update(tensor)
            return
        tensors.append(dict(tensor))

    def add_input(self, input: dict[str, Any]) -> None:  # noqa: A002 - Triton's name
        self._add_tensor("input", input, ("name", "data_type", "dims", "optional"))

    def add_output(self, output: dict[str, Any]) -> None:
        self._add_tensor("output", output, ("name", "data_type", "dims"))

    def set_model_transaction_policy(self, transaction_policy_dict: dict[str, Any]) -> None:
        if any(key != "decoupled" for key in transaction_policy_dict):
            raise ValueError(
                "model transaction property in auto-complete-config function for model '"
                + self._name
                + "' contains property other than 'decoupled'."
            )
        policy = self._model_config.setdefault("model_transaction_policy", {})
        if "decoupled" in transaction_policy_dict:
            wanted = transaction_policy_dict["decoupled"]
            if "decoupled" in policy and policy["decoupled"] != wanted:
                raise ValueError(
                    "trying to change decoupled property in auto-complete-config for model '"
                    + self._name
                    + "', which is already set to '"
                    + str(policy["decoupled"])
                    + "'."
                )
            policy["decoupled"] = wanted


def get_model_dir() -> str:
    """The folder of the model's version that runs here (Triton's helper)."""
    return _model_dir


def is_model_ready(model_name: str, model_version: str = "") -> bool:
    return bool(
        _require_services().call(
            "repository", {"action": "ready", "model": model_name, "version": model_version}, True
        )
    )


def load_model(model_name: str, config: str = "", files: dict[str, bytes] | None = None) -> None:
    if files:
        raise TritonModelException("loading a model with files is not supported by this server")
    _repository_call("load", model_name, config=config)


def unload_model(model_name: str, unload_dependents: bool = False) -> None:
    _repository_call("unload", model_name)


def _repository_call(action: str, model_name: str, **arguments: Any) -> None:
    try:
        _require_services().call(
            "repository", {"action": action, "model": model_name, **arguments}, True
        )
    except OpserveError as exc:
        raise TritonModelException(exc.message) from None


# logging -----------------------------------------------------------------------------------------
class LogLevel:
    INFO = 0
    WARNING = 1
    ERROR = 2
    VERBOSE = 3


_LEVEL_NAMES = {
    LogLevel.INFO: "INFO",
    LogLevel.WARNING: "WARNING",
    LogLevel.ERROR: "ERROR",
    LogLevel.VERBOSE: "VERBOSE",
}


class Logger:
    """Lines into the server's log, labelled with the model."""

    @staticmethod
    def log(message: str, level: int = LogLevel.INFO) -> None:
        arguments = {"level": _LEVEL_NAMES.get(level, "INFO"), "message": str(message)}
        arguments["model"] = _model_name
        frame = sys._getframe(1)
        while frame.f_back is not None and frame.f_code.co_filename == __file__:
            frame = frame.f_back  # the model's line, as Triton's log shows it
        arguments["where"] = f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"
        if _services is None:
            print(f"{arguments['level']} {arguments['model']}: {message}")  # noqa: T201
            return
        _services.call("log", arguments, False)

    @staticmethod
    def log_info(message: str) -> None:
        Logger.log(message, LogLevel.INFO)

    @staticmethod
    def log_warn(message: str) -> None:
        Logger.log(message, LogLevel.WARNING)

    @staticmethod
    def log_error(message: str) -> None:
        Logger.log(message, LogLevel.ERROR)

    @staticmethod
    def log_verbose(message: str) -> None:
        Logger.log(message, LogLevel.VERBOSE)


# custom metrics ----------------------------------------------------------------------------------
class MetricFamily:
    """A family of custom metrics on the server's `/metrics`."""

    COUNTER = 0
    GAUGE = 1
    HISTOGRAM = 2
    _KINDS = {COUNTER: "counter", GAUGE: "gauge", HISTOGRAM: "histogram"}

    def __init__(self, name: str, description: str, kind: int) -> None:
        if kind not in self._KINDS:
            raise TritonModelException(f"unknown metric kind {kind}")
        self.name, self.description, self.kind = name, description, kind
        self._call("family", {})

    def _call(self, operation: str, arguments: dict[str, Any], wait: bool = True) -> Any:
        arguments = {
            "operation": operation,
            "family": self.name,
            "description": self.description,
            "kind": self._KINDS[self.kind],
            **arguments,
        }
        try:
            return _require_services().call("metric", arguments, wait)
        except OpserveError as exc:
            raise TritonModelException(exc.message) from None

    def Metric(
        self, labels: dict[str, str] | None = None, buckets: list[float] | None = None
    ) -> Metric:  # noqa: N802 - Triton's name
        return Metric(self, labels or {}, buckets)


class Metric:
    def __init__(
        self, family: MetricFamily, labels: dict[str, str], buckets: list[float] | None = None
    ) -> None:
        if family.kind == MetricFamily.HISTOGRAM and buckets is None:
            raise TritonModelException("a histogram metric needs buckets")
        if family.kind != MetricFamily.HISTOGRAM and buckets is not None:
            raise TritonModelException("only histogram metrics take buckets")
        self._family = family
        self._labels = {str(k): str(v) for k, v in labels.items()}
        self._family._call("metric", {"labels": self._labels, "buckets": buckets})

    def _update(self, operation: str, value: float) -> None:
        self._family._call(operation, {"labels": self._labels, "value": float(value)}, False)

    def increment(self, value: float) -> None:
        if self._family.kind == MetricFamily.COUNTER and value < 0:
            raise TritonModelException("a counter cannot be incremented by a negative value")
        if self._family.kind == MetricFamily.HISTOGRAM:
            raise TritonModelException("a histogram metric is updated with observe()")
        self._update("increment", value)

    def set(self, value: float) -> None:
        if self._family.kind != MetricFamily.GAUGE:
            raise TritonModelException("only a gauge metric can be set")
        self._update("set", value)

    def observe(self, value: float) -> None:
        if self._family.kind != MetricFamily.HISTOGRAM:
            raise TritonModelException("only a histogram metric can observe")
        self._update("observe", value)

    def value(self) -> float:
        return float(self._family._call("value", {"labels": self._labels}))
