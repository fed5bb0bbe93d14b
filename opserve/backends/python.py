"""The Python backend: Triton's `model.py` with `class TritonPythonModel`, unchanged.

Phase one imports `model.py` and runs its `auto_complete_config` (when it has one) on the config;
phase two loads the model's op libraries, then calls `initialize(args)` with Triton's keys. Each
execution hands `execute` the batch as a list of `pb_utils.InferenceRequest`; a model that is not
decoupled returns one `pb_utils.InferenceResponse` per request, a decoupled one answers through
each request's response sender. `async def execute` runs on an event loop of the worker's own.
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib.util
import inspect
import json
import sys
import threading
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

from opserve.backends import pb_utils
from opserve.backends.base import Backend, BackendContext, Description, Reply, Request
from opserve.backends.onnx_python_ops import is_python_ops, load_python_ops
from opserve.errors import InternalError, OpserveError, UnavailableError
from opserve.hints import missing_model_file

MODULE_NAME = "triton_python_backend_utils"
_OURS = str(Path(__file__).resolve().parent)  # frames of the backend itself are not the model's


def describe_exception(exc: BaseException) -> str:
    """Triton's form: the exception's last line, then where it was raised, innermost first."""
    last = traceback.format_exception_only(type(exc), exc)[-1].strip()
    frames = [
        f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_OURS)
    ]
    where = "".join(f"  {f.filename}({f.lineno}): {f.name}\n" for f in reversed(frames))
    return f"{last}\n\nAt:\n{where}" if where else last


class PythonBackend(Backend):
    def __init__(self, context: BackendContext) -> None:
        super().__init__(context)
        self._module: ModuleType | None = None
        self._model: Any = None
        self._outputs: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.decoupled = False  # answers through response senders, not execute's return

    @property
    def _label(self) -> str:
        return f"model '{self.context.model_name}'"

    # loading -----------------------------------------------------------------------------------
    def _import(self) -> type:
        if self._module is None:
            sys.modules[MODULE_NAME] = pb_utils
            pb_utils._install(
                self.context.services, self.context.model_name, str(self.context.version_dir)
            )
            path = self.context.model_path
            if not path.is_file():
                raise UnavailableError(f"{self._label}: {missing_model_file(path)}")
            # as Triton: the version folder and the model folder are on the path, for the
            # model's own modules
            for folder in (self.context.version_dir, self.context.model_dir):
                if str(folder) not in sys.path:
                    sys.path.append(str(folder))
            spec = importlib.util.spec_from_file_location(f"opserve_model_{path.stem}", path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
            except Exception as exc:
                raise UnavailableError(
                    f"{self._label}: importing {path.name} failed: {describe_exception(exc)}"
                ) from exc
            self._module = module
        model_class = getattr(self._module, "TritonPythonModel", None)
        if not isinstance(model_class, type):
            raise UnavailableError(
                f"{self._label}: {self.context.model_path.name} defines no class TritonPythonModel"
            )
        return model_class

    def describe(self) -> Description:
        model_class = self._import()
        hook = getattr(model_class, "auto_complete_config", None)
        if hook is None or not self.context.auto_complete:
            return Description()
        config = pb_utils.ModelConfig(json.loads(self.context.config_json))
        try:
            result = hook(config)
        except Exception as exc:
            raise UnavailableError(
                f"{self._label}: auto_complete_config failed: {describe_exception(exc)}"
            ) from exc
        if not isinstance(result, pb_utils.ModelConfig):
            raise UnavailableError(
                f"{self._label}: auto_complete_config must return the pb_utils.ModelConfig it "
                f"was given, not {type(result).__name__}"
            )
        return Description(config_json=json.dumps(result.as_dict()))

    def start(self, context: BackendContext) -> None:
        self.context = context
        policy = context.config_dict.get("model_transaction_policy") or {}
        self.decoupled = bool(policy.get("decoupled", False))
        # the config's outputs: what a request that names none asks for
        self._outputs = [o.get("name", "") for o in context.config_dict.get("output", [])]
        model_class = self._import()
        pb_utils._install(context.services, context.model_name, str(context.version_dir))
        self._load_op_libraries()
        try:
            self._model = model_class()
            if hasattr(self._model, "initialize"):
                self._call(self._model.initialize, self._args())
        except OpserveError:
            raise
        except Exception as exc:
            raise UnavailableError(
                f"{self._label}: initialize failed: {describe_exception(exc)}"
            ) from exc

    def load(self) -> None:  # `start` loads; nothing is loaded to describe the model
        pass

    def _load_op_libraries(self) -> None:
        """The model's `model_operations`, before `initialize`: PyTorch libraries through
        `torch.ops.load_library` (so `torch.ops.<ns>.<op>` finds them), TensorFlow ones through
        `tf.load_op_library`, Python op files (onnxruntime-extensions) run, any other into the
        process with its symbols global."""
        frameworks = self.context.library_frameworks
        for library in self.context.op_libraries:
            framework = frameworks.get(str(library))
            try:
                if is_python_ops(library):  # the model registers onnxruntime-extensions itself
                    load_python_ops(library)
                elif framework == "pytorch":
                    import torch

                    torch.ops.load_library(str(library))
                elif framework == "tensorflow":
                    import tensorflow as tf

                    tf.load_op_library(str(library))
                else:
                    ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
            except Exception as exc:
                raise UnavailableError(f"failed to load op library '{library}': {exc}") from exc
            self.loaded_op_libraries.append(library)

    def _args(self) -> dict[str, str]:
        """`initialize`'s argument, with Triton's keys."""
        context = self.context
        groups = context.config_dict.get("instance_group") or [{}]
        kind = str(groups[0].get("kind", "KIND_CPU")).replace("KIND_", "")
        return {
            "model_config": context.config_json,
            "model_instance_kind": "CPU" if kind in ("CPU", "AUTO", "MODEL") else kind,
            "model_instance_name": context.instance_name,
            "model_instance_device_id": "0",
            "model_repository": str(context.model_dir),
            "model_version": str(context.version),
            "model_name": context.model_name,
        }

    def _call(self, function: Any, *arguments: Any) -> Any:
        """Call a model method; a coroutine runs to completion on the worker's event loop."""
        result = function(*arguments)
        if inspect.isawaitable(result):
            return asyncio.run_coroutine_threadsafe(_awaited(result), self._event_loop()).result()
        return result

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            threading.Thread(
                target=loop.run_forever, name="opserve-model-loop", daemon=True
            ).start()
            self._loop = loop
        return self._loop

    # executing ---------------------------------------------------------------------------------
    def run(self, requests: list[Request]) -> list[Reply | None] | None:
        model = self._model
        if model is None:
            raise UnavailableError(f"{self._label} is not loaded")
        name = self.context.model_name
        batch = [
            pb_utils.InferenceRequest._from_received(r, name, self._outputs, self.decoupled)
            for r in requests
        ]
        try:
            result = model.execute(batch)
            if type(result) is not list and inspect.isawaitable(result):
                future = asyncio.run_coroutine_threadsafe(_awaited(result), self._event_loop())
                if self.decoupled:  # as in Triton: async executes of a decoupled model overlap
                    future.add_done_callback(lambda done: self._async_done(done, requests))
                    return None
                result = future.result()
        except pb_utils.TritonModelException as exc:
            raise InternalError(self._failure(exc)) from exc
        except OpserveError:
            raise
        except Exception as exc:
            raise InternalError(self._failure(exc)) from exc
        if self.decoupled:
            if result is not None:
                raise InternalError(self._decoupled_return())
            return None
        if not isinstance(result, list):
            raise InternalError(
                self._failure_text(
                    f"Expected a list in the execute return, found type '{type(result)}'."
                )
            )
        if len(result) != len(requests):
            raise InternalError(
                self._failure_text(
                    "Number of InferenceResponse objects do not match the number of "
                    f"InferenceRequest objects. InferenceRequest(s) size is:{len(requests)}, and "
                    f"InferenceResponse(s) size is:{len(result)}\n"
                )
            )
        replies: list[Reply | None] = []
        for response, request in zip(result, requests, strict=True):
            if response is None:  # answered through its response sender
                replies.append(None)
                continue
            if not isinstance(response, pb_utils.InferenceResponse):
                raise InternalError(
                    self._failure_text(
                        "Expected an 'InferenceResponse' object in the execute function return "
                        f"list, found type '{type(response)}'."
                    )
                )
            replies.append(response._to_reply(request.outputs))
        return replies

    def _decoupled_return(self) -> str:
        return (
            f"Python model '{self.context.instance_name}' is using the decoupled mode and the "
            "execute function must return None."
        )

    def _async_done(self, done: Any, requests: list[Request]) -> None:
        """A decoupled model's async execute ended: a failure closes the requests it left open."""
        exc = done.exception()
        if exc is None and done.result() is None:
            return
        message = self._failure(exc) if exc is not None else self._decoupled_return()
        services = self.context.services
        assert services is not None
        for request in requests:
            try:
                services.respond(request, Reply(error=InternalError(message)), True)
            except OpserveError:
                pass  # already closed by the model

    def _failure(self, exc: BaseException) -> str:
        return self._failure_text(describe_exception(exc))

    def _failure_text(self, message: str) -> str:
        """Triton's words; the instance is named `<model>_<group>_<index>`."""
        return (
            f"Failed to process the request(s) for model '{self.context.instance_name}', "
            f"message: {message}"
        )

    def unload(self) -> None:
        model, self._model = self._model, None
        if model is not None and hasattr(model, "finalize"):
            try:
                self._call(model.finalize)
            except Exception as exc:  # finalize's failure is only worth a log line
                pb_utils.Logger.log_error(f"finalize failed: {describe_exception(exc)}")
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop = None


async def _awaited(awaitable: Any) -> Any:
    return await awaitable
