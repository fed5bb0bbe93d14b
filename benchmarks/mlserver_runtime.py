"""An MLServer runtime that runs an ONNX model with onnxruntime: the same work opserve does.

Loaded by MLServer (in its own virtual environment) from the benchmark's model folder.
"""

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxRuntimeModel(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(self.settings.parameters.uri, options)
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        array = NumpyCodec.decode_input(payload.inputs[0])
        result = self._session.run([self._output], {self._input: array})[0]
        return InferenceResponse(
            model_name=self.name, outputs=[NumpyCodec.encode_output(self._output, result)]
        )
