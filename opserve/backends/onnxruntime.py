"""The ONNX Runtime backend: platform `onnxruntime_onnx`."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from opserve.backends.base import MISSING_OP_HINT, Backend, BackendContext, translated
from opserve.backends.onnx_python_ops import is_python_ops, load_python_ops
from opserve.errors import InvalidArgumentError, UnavailableError
from opserve.hints import missing_model_file
from opserve.signature import ModelSignature, TensorSpec

log = logging.getLogger(__name__)

_ORT_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
    "tensor(bfloat16)": "BF16",
}


class OnnxRuntimeBackend(Backend):
    def __init__(self, context: BackendContext) -> None:
        super().__init__(context)
        self._session: ort.InferenceSession | None = None

    def load(self) -> None:
        options = ort.SessionOptions()
        self._apply_parameters(options)
        self._register_op_libraries(options)
        path = self.context.model_path
        if path.is_dir():  # a folder holding model.onnx and its external data
            path = path / "model.onnx"
        if not path.exists():
            raise UnavailableError(missing_model_file(path))
        try:
            self._session = ort.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            message = f"onnxruntime failed to load '{path}': {exc}"
            if "is not a registered function/op" in message:
                message += f" (hint: {MISSING_OP_HINT})"
            raise UnavailableError(message) from exc

    def _register_op_libraries(self, options: ort.SessionOptions) -> None:
        """Shared libraries as they are; Python op files run first (their `onnx_op` decorators
        register with onnxruntime-extensions), then that library serves them, registered once."""
        libraries = self.context.libraries_to_load
        extensions: Path | None = None
        for library in filter(is_python_ops, libraries):
            try:
                extensions = load_python_ops(library)
            except Exception as exc:
                raise UnavailableError(
                    f"failed to load Python ops '{library}': {type(exc).__name__}: {exc}"
                ) from exc
        for library in libraries:
            if is_python_ops(library):
                target, extensions = extensions, None  # registered with the first op file
            else:
                target = library
            if target is not None:
                try:
                    options.register_custom_ops_library(str(target))
                except Exception as exc:
                    raise UnavailableError(f"failed to load op library '{library}': {exc}") from exc
            self.loaded_op_libraries.append(library)

    def _apply_parameters(self, options: ort.SessionOptions) -> None:
        """Triton's onnxruntime backend parameters and graph level; spinning threads are off by
        default. Read from the config's JSON form: the worker may run in an environment of the
        model's own (`EXECUTION_ENV_PATH`) that has no protobuf."""
        config = self.context.config_dict
        parameters = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        intra = int(parameters.get("intra_op_thread_count", "0"))
        inter = int(parameters.get("inter_op_thread_count", "0"))
        options.intra_op_num_threads, options.inter_op_num_threads = intra, inter
        if self.context.shared and not intra and not inter and _global_thread_pools():
            # many models in one process: one pool of threads for all of them, not one per session
            options.use_per_session_threads = False
        # Triton's `optimization { graph { level } }`: -1 basic, 1 extended, otherwise all
        level = int(config.get("optimization", {}).get("graph", {}).get("level", 0))
        options.graph_optimization_level = {
            -1: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            1: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        }.get(level, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        spin = parameters.get("allow_spinning", "0")
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.add_session_config_entry("session.inter_op.allow_spinning", spin)

    def signature(self) -> ModelSignature:
        session = self._require_session()

        def spec(node, optional: bool = False) -> TensorSpec:
            shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in node.shape)
            return TensorSpec(node.name, _ORT_TYPES.get(node.type, ""), shape, optional)

        # inputs with an initializer are optional ("overridable initializers")
        inputs = [spec(n) for n in session.get_inputs()]
        inputs += [spec(n, True) for n in session.get_overridable_initializers()]
        return ModelSignature(tuple(inputs), tuple(spec(n) for n in session.get_outputs()))

    def execute(
        self, inputs: dict[str, np.ndarray], outputs: list[str] | None
    ) -> dict[str, np.ndarray]:
        session = self._require_session()
        feeds = {
            name: (_bytes_to_str(name, array) if array.dtype == np.object_ else array)
            for name, array in inputs.items()
        }
        names = outputs or [o.name for o in session.get_outputs()]
        invalid = (ort.capi.onnxruntime_pybind11_state.InvalidArgument,)
        with translated(f"onnxruntime failed to run model '{self.context.model_name}'", invalid):
            results = session.run(names, feeds)
        return dict(zip(names, results, strict=True))

    def unload(self) -> None:
        self._session = None

    def _require_session(self) -> ort.InferenceSession:
        if self._session is None:
            raise UnavailableError(f"model '{self.context.model_name}' is not loaded")
        return self._session


_GLOBAL_POOLS: bool | None = None


def _global_thread_pools() -> bool:
    """ONNX Runtime's process-wide thread pools (default sizes), set up before the first session
    of a shared worker; False when they cannot be (an environment already exists)."""
    global _GLOBAL_POOLS
    if _GLOBAL_POOLS is None:
        try:
            ort.capi._pybind_state.set_global_thread_pool_sizes(0, 0)
            _GLOBAL_POOLS = True
        except Exception:  # an older runtime, or an environment made without global pools
            log.warning("onnxruntime's global thread pools are not available: one per session")
            _GLOBAL_POOLS = False
    return _GLOBAL_POOLS


def _bytes_to_str(name: str, array: np.ndarray) -> np.ndarray:
    """ONNX Runtime's string tensors want `str` elements: UTF-8 text, or a client error."""
    out = np.empty(array.shape, dtype=np.object_)
    flat_in, flat_out = array.reshape(-1), out.reshape(-1)
    for i, element in enumerate(flat_in):
        if isinstance(element, bytes):
            try:
                element = element.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidArgumentError(
                    f"input '{name}': BYTES element {i} is not valid UTF-8, which ONNX Runtime's "
                    f"string tensors need ({exc.reason} at byte {exc.start})"
                ) from None
        flat_out[i] = element
    return out
