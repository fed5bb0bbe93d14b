"""Answers each request with the position of its execution (0, 1, 2, ...) after sleeping
SLEEP seconds: the order in which the scheduler served the requests."""

import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.executed = 0

    def execute(self, requests):
        responses = []
        for request in requests:
            sleep = float(pb_utils.get_input_tensor_by_name(request, "SLEEP").as_numpy()[0, 0])
            pb_utils.Logger.log_info(f"ordered executes {self.executed}")
            time.sleep(sleep)
            order = np.array([[self.executed]], dtype=np.int32)
            self.executed += 1
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("ORDER", order)]))
        return responses
