"""The PyTorch backend: TorchScript models, platform `pytorch_libtorch`.

Triton's naming rules: inputs named `<anything>__<index>` are passed by position; otherwise input
names must match the arguments of `forward`. Outputs named `<anything>__<index>` take that element
of a tuple or list result; otherwise outputs map to the result in config order.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import torch

from opserve.backends.base import MISSING_OP_HINT, Backend, BackendContext, translated
from opserve.errors import (
    InternalError,
    UnavailableError,
    UnsupportedError,
)
from opserve.hints import missing_model_file
from opserve.proto import model_config_pb2
from opserve.sequence_config import sequence_input_names, sequence_output_names
from opserve.signature import ModelSignature

log = logging.getLogger(__name__)

_INDEXED = re.compile(r"^.*__(\d+)$")


class PyTorchBackend(Backend):
    def __init__(self, context: BackendContext) -> None:
        super().__init__(context)
        self._module: torch.jit.ScriptModule | None = None
        self._device = torch.device("cpu")
        self._input_positions: dict[str, int] = {}
        self._output_positions: dict[str, int] = {}
        self._bf16_inputs: set[str] = set()

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
        # state outputs of the sequence batcher follow the config's outputs
        outputs = [t.name for t in self.context.config.output]
        outputs += sequence_output_names(self.context.config)
        self._output_positions = {
            name: int(m.group(1)) if (m := _INDEXED.match(name)) else i
            for i, name in enumerate(outputs)
        }

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
        names = [t.name for t in self.context.config.input]
        names += sequence_input_names(self.context.config)  # controls and states
        if all(_INDEXED.match(n) for n in names):
            return {n: int(_INDEXED.match(n).group(1)) for n in names}  # type: ignore[union-attr]
        arguments = [a.name for a in module.forward.schema.arguments[1:]]  # type: ignore[attr-defined]  # skip self
        unknown = [n for n in names if n not in arguments]
        if unknown:
            raise UnavailableError(
                f"inputs {unknown} of model '{self.context.config.name}' follow neither naming rule: "
                f"name them <name>__<index> or after forward's arguments {arguments}"
            )
        return {n: arguments.index(n) for n in names}

    def signature(self) -> ModelSignature:
        # TorchScript records no shapes or types: the config must give them (as in Triton).
        return ModelSignature((), ())

    def execute(
        self, inputs: dict[str, np.ndarray], outputs: list[str] | None
    ) -> dict[str, np.ndarray]:
        module = self._require_module()
        arguments: list[torch.Tensor | None] = [None] * (
            max(self._input_positions.values(), default=-1) + 1
        )
        for name, array in inputs.items():
            if array.dtype == np.object_:
                raise UnsupportedError("the PyTorch backend does not take BYTES tensors")
            if not array.flags.writeable:
                array = array.copy()
            tensor = torch.from_numpy(array)
            if name in self._bf16_inputs:  # BF16 crosses as 16-bit words
                tensor = tensor.view(torch.bfloat16)
            arguments[self._input_positions[name]] = tensor.to(self._device)
        while arguments and arguments[-1] is None:
            arguments.pop()
        with (
            translated(
                f"PyTorch failed to run model '{self.context.config.name}'",
                (TypeError, ValueError, IndexError),
            ),
            torch.inference_mode(),
        ):
            result = module(*arguments)
        results = list(result) if isinstance(result, (tuple, list)) else [result]
        names = outputs or list(self._output_positions)
        produced: dict[str, np.ndarray] = {}
        for name in names:
            position = self._output_positions[name]
            if position >= len(results):
                raise InternalError(
                    f"model '{self.context.config.name}' returned {len(results)} outputs; "
                    f"output '{name}' wants position {position}"
                )
            value = results[position].detach().cpu()
            if value.dtype == torch.bfloat16:  # numpy has no bfloat16: hand over the 16-bit words
                value = value.view(torch.uint16)
            produced[name] = value.numpy()
        return produced

    def unload(self) -> None:
        self._module = None

    def _require_module(self) -> torch.jit.ScriptModule:
        if self._module is None:
            raise UnavailableError(f"model '{self.context.config.name}' is not loaded")
        return self._module
