"""The PyTorch backend: TorchScript models, platform `pytorch_libtorch`.

Triton's rules (pytorch_backend `ModelInstanceState::GetNamingConvention`, `ValidateInputs`,
`SetInputTensors`, `Execute`, `ReadOutputTensors`):

- inputs: when every config input names an argument of `forward`, by that argument; else when
  every name is `<name>__<index>` (the index after the first `__`), by that position; else by
  their order in the config ("strict config ordering"). A `forward` taking one `Dict[str,
  Tensor]` gets every input by name. The config must give as many inputs as `forward` takes.
- outputs: `<name>__<index>` names take that element of a tuple result; else the config's order.
- strings: a BYTES input (one dimension, batch included) is passed as a `List[str]`, the batch's
  elements in order; a `List[str]` result (alone or in a tuple) is a BYTES output of shape
  `[len]`, split over a batch's requests one element per batch entry.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from opserve.backends.base import MISSING_OP_HINT, Backend, BackendContext, translated
from opserve.errors import InternalError, InvalidArgumentError, UnavailableError
from opserve.hints import missing_model_file
from opserve.proto import model_config_pb2
from opserve.sequence_config import sequence_input_names, sequence_output_names
from opserve.signature import ModelSignature

log = logging.getLogger(__name__)

# numpy's dtype strings of the tensors a model returns -> config TYPE_ names
_TORCH_TYPES = {
    "|b1": "TYPE_BOOL",
    "|u1": "TYPE_UINT8",
    "|i1": "TYPE_INT8",
    "<i2": "TYPE_INT16",
    "<i4": "TYPE_INT32",
    "<i8": "TYPE_INT64",
    "<f2": "TYPE_FP16",
    "<f4": "TYPE_FP32",
    "<f8": "TYPE_FP64",
}


def _named_index(name: str) -> int | None:
    """The index of a `<name>__<index>` name, as Triton reads it: after the first `__`, all
    digits (none read as 0); None for a name that does not follow the convention."""
    head, delimiter, tail = name.partition("__")
    if not delimiter or not all(c.isdigit() for c in tail):
        return None
    return int(tail) if tail else 0


class PyTorchBackend(Backend):
    def __init__(self, context: BackendContext) -> None:
        super().__init__(context)
        self._module: torch.jit.ScriptModule | None = None
        self._device = torch.device("cpu")
        self._input_positions: dict[str, int] = {}
        self._output_positions: dict[str, int] = {}
        self._output_types: dict[str, str] = {}  # config output -> its TYPE_ name
        self._bf16_inputs: set[str] = set()
        self._dict_input = False  # forward takes one Dict[str, Tensor]: inputs by name

    def load(self) -> None:
        for library in self.context.libraries_to_load:
            try:
                torch.ops.load_library(str(library))
            except Exception as exc:
                raise UnavailableError(f"failed to load op library '{library}': {exc}") from exc
            self.loaded_op_libraries.append(library)
        self._device = self._choose_device()
        path = self.context.model_path
        if not path.exists():
            raise UnavailableError(missing_model_file(path))
        try:
            module = torch.jit.load(str(path), map_location=self._device)
        except Exception as exc:
            message = f"PyTorch failed to load '{path}': {exc}"
            if "Unknown builtin op" in str(exc) or "unknown op" in str(exc).lower():
                message += f" (hint: {MISSING_OP_HINT})"
            raise UnavailableError(message) from exc
        module.eval()
        self._module = module
        self._input_positions = self._map_inputs(module)
        self._bf16_inputs = {
            t.name for t in self.context.config.input if t.data_type == model_config_pb2.TYPE_BF16
        }
        self._output_positions = self._map_outputs()
        self._output_types = {
            t.name: model_config_pb2.DataType.Name(t.data_type) for t in self.context.config.output
        }
        self._check_string_dims()

    def _choose_device(self) -> torch.device:
        groups = self.context.config.instance_group
        wants_gpu = any(g.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU for g in groups)
        if wants_gpu and torch.cuda.is_available():
            gpus = [gpu for g in groups for gpu in g.gpus]
            return torch.device(f"cuda:{gpus[0] if gpus else 0}")
        if wants_gpu:
            log.warning(
                "model '%s' asks for a GPU, but none is available: using the CPU",
                self.context.config.name,
            )
        return torch.device("cpu")

    def _map_inputs(self, module: torch.jit.ScriptModule) -> dict[str, int]:
        config = self.context.config
        names = [t.name for t in config.input]
        names += sequence_input_names(config)  # controls and states
        arguments = module.forward.schema.arguments  # type: ignore[attr-defined]
        if arguments and arguments[0].name == "self":
            arguments = arguments[1:]
        if len(arguments) == 1 and isinstance(arguments[0].type, torch.DictType):
            self._dict_input = True
            return {n: i for i, n in enumerate(names)}
        if len(arguments) != len(names):  # Triton's words
            raise InvalidArgumentError(
                f"unable to load model '{config.name}', configuration expects {len(names)} "
                f"inputs, model provides {len(arguments)}"
            )
        parameters = [a.name for a in arguments]
        if all(n in parameters for n in names):
            return {n: parameters.index(n) for n in names}
        indices = [_named_index(n) for n in names]
        if all(i is not None for i in indices):
            return {n: i for n, i in zip(names, indices, strict=True) if i is not None}
        log.warning(
            "inputs of model '%s' are neither arguments of its forward (%s) nor named "
            "<name>__<index>: they are passed in the config's order",
            config.name,
            ", ".join(parameters),
        )
        return {n: i for i, n in enumerate(names)}

    def _map_outputs(self) -> dict[str, int]:
        config = self.context.config
        names = [t.name for t in config.output]
        positions = {n: i for n in names if (i := _named_index(n)) is not None}
        if len(positions) != len(names):
            positions = {n: i for i, n in enumerate(names)}  # strict config ordering
        for name in sequence_output_names(config):  # states are always <name>__<index>
            index = _named_index(name)
            positions[name] = len(names) if index is None else index
        return positions

    def _check_string_dims(self) -> None:
        """Strings cross as a List[str]: one dimension, the batch's included (Triton's words)."""
        config = self.context.config
        for kind, tensors in (("input", config.input), ("output", config.output)):
            for t in tensors:
                if t.data_type != model_config_pb2.TYPE_STRING:
                    continue
                dims = t.reshape.shape if t.HasField("reshape") else t.dims
                if len(dims) + (config.max_batch_size > 0) > 1:
                    raise InvalidArgumentError(
                        f"Triton only supports 1 dimensional List of String as {kind} for "
                        f"'{t.name}' for model '{config.name}'"
                    )

    def signature(self) -> ModelSignature:
        # TorchScript records no shapes or types: the config must give them (as in Triton).
        return ModelSignature((), ())

    def execute(
        self, inputs: dict[str, np.ndarray], outputs: list[str] | None
    ) -> dict[str, np.ndarray]:
        module = self._require_module()
        arguments: list[Any] = [None] * (max(self._input_positions.values(), default=-1) + 1)
        for name, array in inputs.items():
            arguments[self._input_positions[name]] = self._argument(name, array)
        while arguments and arguments[-1] is None:
            arguments.pop()
        if self._dict_input:
            arguments = [{name: arguments[self._input_positions[name]] for name in inputs}]
        with (
            translated(
                f"PyTorch failed to run model '{self.context.config.name}'",
                (TypeError, ValueError, IndexError),
            ),
            torch.inference_mode(),
        ):
            result = module(*arguments)
        results = list(result) if isinstance(result, tuple) else [result]
        names = outputs or list(self._output_positions)
        produced: dict[str, np.ndarray] = {}
        for name in names:
            position = self._output_positions[name]
            if position >= len(results):
                raise InternalError(
                    f"model '{self.context.config.name}' returned {len(results)} outputs; "
                    f"output '{name}' wants position {position}"
                )
            produced[name] = self._output(name, results[position])
        return produced

    def _argument(self, name: str, array: np.ndarray) -> Any:
        if array.dtype == np.object_:  # BYTES: a List[str] of the batch's elements
            try:
                return [bytes(e).decode("utf-8") for e in array.reshape(-1)]
            except UnicodeDecodeError as exc:
                raise InvalidArgumentError(
                    f"input '{name}' of model '{self.context.config.name}' holds an element "
                    f"that is not UTF-8 (a TorchScript str): {exc}"
                ) from None
        if not array.flags.writeable:
            array = array.copy()
        tensor = torch.from_numpy(array)
        if name in self._bf16_inputs:  # BF16 crosses as 16-bit words
            tensor = tensor.view(torch.bfloat16)
        return tensor.to(self._device)

    def _output(self, name: str, value: Any) -> np.ndarray:
        model = self.context.config.name
        if isinstance(value, list) and all(isinstance(e, str) for e in value):
            array = np.empty(len(value), dtype=np.object_)
            array[:] = [e.encode("utf-8") for e in value]
            return array
        if not isinstance(value, torch.Tensor):  # Triton's words
            raise InternalError(
                f"PyTorch execute failure: output '{name}' of model '{model}' must be of type "
                f"Tensor or List[str], received {type(value).__name__}"
            )
        value = value.detach().cpu()
        if value.dim() == 0:
            raise InvalidArgumentError(f"output '{name}' is a scalar which is not supported.")
        if value.dtype == torch.bfloat16:  # numpy has no bfloat16: hand over the 16-bit words
            return value.view(torch.uint16).numpy()
        array = value.numpy()
        expected = self._output_types.get(name)
        provided = _TORCH_TYPES.get(array.dtype.str)
        if expected is not None and provided is not None and expected != provided:
            raise InvalidArgumentError(
                f"configuration expects datatype {expected} for output '{name}', model "
                f"provides {provided}"
            )
        return array

    def unload(self) -> None:
        self._module = None

    def _require_module(self) -> torch.jit.ScriptModule:
        if self._module is None:
            raise UnavailableError(f"model '{self.context.config.name}' is not loaded")
        return self._module
