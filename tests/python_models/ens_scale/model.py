"""An ensemble's preprocessing step: Y = 2 * X; a negative element fails the request."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            if (x < 0).any():
                raise ValueError("ens_scale refuses negative input")
            responses.append(
                pb_utils.InferenceResponse([pb_utils.Tensor("Y", (2 * x).astype(np.float32))])
            )
        return responses
