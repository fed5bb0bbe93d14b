"""The TensorFlow backend: platforms `tensorflow_savedmodel` and `tensorflow_graphdef`.

SavedModel: the signature `serving_default`, or the one named by the config parameter
`TF_SIGNATURE_DEF` (and the tag in `TF_GRAPH_TAG`, default `serve`); tensor names are the
signature's input and output keys, and auto-complete reads them. GraphDef: a frozen graph whose
tensors are named by the config (`NAME` means the tensor `NAME:0`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from opserve.backends.base import (  # noqa: E402
    MISSING_OP_HINT,
    Backend,
    BackendContext,
    exception_message,
    translated,
)
from opserve.datatypes import numpy_to_v2  # noqa: E402
from opserve.errors import OpserveError, UnavailableError  # noqa: E402
from opserve.hints import missing_model_file  # noqa: E402
from opserve.signature import ModelSignature, TensorSpec  # noqa: E402


def _spec(name: str, spec: Any) -> TensorSpec:
    shape = (
        tuple(-1 if d is None else int(d) for d in spec.shape)
        if spec.shape.rank is not None
        else (-1,)
    )
    try:
        datatype = (
            "BYTES" if spec.dtype == tf.string else numpy_to_v2(np.dtype(spec.dtype.as_numpy_dtype))
        )
    except OpserveError:
        datatype = ""
    return TensorSpec(name, datatype, shape)


class TensorFlowBackend(Backend):
    def __init__(self, context: BackendContext) -> None:
        super().__init__(context)
        self._run: Callable[[dict[str, np.ndarray], list[str]], dict[str, np.ndarray]] | None = None
        self._signature = ModelSignature((), ())
        self._output_names: list[str] = []
        self._session: Any = None

    def load(self) -> None:
        for library in self.context.libraries_to_load:
            try:
                tf.load_op_library(str(library))
            except Exception as exc:
                raise UnavailableError(
                    f"failed to load op library '{library}': {exception_message(exc)}"
                ) from exc
            self.loaded_op_libraries.append(library)
        path = self.context.model_path
        if not path.exists():
            raise UnavailableError(missing_model_file(path))
        try:
            if self.context.config.platform == "tensorflow_graphdef":
                self._load_graphdef(path)
            else:
                self._load_savedmodel(path)
        except OpserveError:
            raise
        except Exception as exc:
            message = f"TensorFlow failed to load '{path}': {exception_message(exc)}"
            if "Op type not registered" in message:
                message += f" (hint: {MISSING_OP_HINT})"
            raise UnavailableError(message) from exc

    def _parameter(self, key: str, default: str) -> str:
        parameters = self.context.config.parameters
        return parameters[key].string_value if key in parameters else default

    def _load_savedmodel(self, path: Any) -> None:
        tag = self._parameter("TF_GRAPH_TAG", "serve")
        name = self._parameter("TF_SIGNATURE_DEF", "serving_default")
        loaded = tf.saved_model.load(str(path), tags=[tag])
        if name not in loaded.signatures:
            raise UnavailableError(
                f"SavedModel '{path}' has no signature '{name}'; it has: {', '.join(loaded.signatures)}"
            )
        function = loaded.signatures[name]
        inputs = function.structured_input_signature[1]
        outputs = function.structured_outputs
        self._signature = ModelSignature(
            tuple(_spec(k, v) for k, v in sorted(inputs.items())),
            tuple(_spec(k, v) for k, v in sorted(outputs.items())),
        )
        self._output_names = sorted(outputs)
        self._loaded = loaded  # keeps the function's variables alive

        def run(feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
            result = function(**{k: tf.constant(v) for k, v in feeds.items()})
            return {n: result[n].numpy() for n in names}

        self._run = run

    def _load_graphdef(self, path: Any) -> None:
        graph_def = tf.compat.v1.GraphDef()
        graph_def.ParseFromString(path.read_bytes())
        graph = tf.Graph()
        with graph.as_default():
            tf.compat.v1.import_graph_def(graph_def, name="")
        self._session = tf.compat.v1.Session(graph=graph)
        self._output_names = [t.name for t in self.context.config.output]

        def tensor_name(name: str) -> str:
            return name if ":" in name else f"{name}:0"

        def run(feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
            fetched = self._session.run(
                [tensor_name(n) for n in names],
                feed_dict={tensor_name(k): v for k, v in feeds.items()},
            )
            return dict(zip(names, fetched, strict=True))

        self._run = run

    def signature(self) -> ModelSignature:
        return self._signature

    def execute(
        self, inputs: dict[str, np.ndarray], outputs: list[str] | None
    ) -> dict[str, np.ndarray]:
        if self._run is None:
            raise UnavailableError(f"model '{self.context.config.name}' is not loaded")
        invalid = (tf.errors.InvalidArgumentError, TypeError, ValueError)
        with translated(f"TensorFlow failed to run model '{self.context.config.name}'", invalid):
            return self._run(inputs, outputs or self._output_names)

    def unload(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None
        self._run = None
