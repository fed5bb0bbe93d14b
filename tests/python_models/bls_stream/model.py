"""BLS to a decoupled model: streams `repeat`'s responses with exec(decoupled=True) and adds them
up; RESPONSES counts what the iterator gave (the final, empty one included, as in Triton)."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            values = pb_utils.get_input_tensor_by_name(request, "IN")
            call = pb_utils.InferenceRequest(
                model_name="repeat", inputs=[values], requested_output_names=["OUT"]
            )
            total, count = 0, 0
            for answer in call.exec(decoupled=True):
                count += 1
                if answer.has_error():
                    raise pb_utils.TritonModelException(answer.error().message())
                out = pb_utils.get_output_tensor_by_name(answer, "OUT")
                if out is not None:
                    total += int(out.as_numpy()[0])
            responses.append(
                pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor("SUM", np.array([total], dtype=np.int32)),
                        pb_utils.Tensor("RESPONSES", np.array([count], dtype=np.int32)),
                    ]
                )
            )
        return responses
