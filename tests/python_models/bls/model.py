"""Pre- and post-processing around another model, called with BLS: OUTPUT0 = 2 * TARGET(INPUT0)
(TARGET names the model to call); ERROR carries that model's error, if any."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            target = pb_utils.get_input_tensor_by_name(request, "TARGET").as_numpy()[0].decode()
            call = pb_utils.InferenceRequest(
                model_name=target,
                inputs=[pb_utils.Tensor("INPUT0", x)],
                requested_output_names=["OUTPUT0"],
            )
            answer = call.exec()
            if answer.has_error():
                out, error = np.zeros_like(x), answer.error().message()
            else:
                out = pb_utils.get_output_tensor_by_name(answer, "OUTPUT0").as_numpy() * 2
                error = ""
            responses.append(
                pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor("OUTPUT0", out.astype(np.float32)),
                        pb_utils.Tensor("ERROR", np.array([error], dtype=np.object_)),
                    ]
                )
            )
        return responses
