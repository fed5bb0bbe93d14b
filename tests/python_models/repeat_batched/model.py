"""Decoupled under dynamic batching: each request of the batch gets two responses (IN, IN + 1)
and the final flag; BATCH says how many requests shared the execute call."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        batch = np.array([[len(requests)]], dtype=np.int32)
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
            sender = request.get_response_sender()
            for step in range(2):
                sender.send(
                    pb_utils.InferenceResponse(
                        [pb_utils.Tensor("OUT", x + step), pb_utils.Tensor("BATCH", batch)]
                    )
                )
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
