"""Decoupled: one response per element of IN, sent from a thread after execute has returned,
then the final flag alone. With FAIL_AT, the response at that index is an error instead."""

import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.threads = []

    def execute(self, requests):
        for request in requests:
            values = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy().copy()
            fail = pb_utils.get_input_tensor_by_name(request, "FAIL_AT")
            fail_at = int(fail.as_numpy()[0]) if fail is not None else -1
            thread = threading.Thread(
                target=self.stream, args=(request.get_response_sender(), values, fail_at)
            )
            thread.start()
            self.threads.append(thread)
        return None

    def stream(self, sender, values, fail_at):
        for index, value in enumerate(values):
            time.sleep(0.01)
            if index == fail_at:
                sender.send(
                    pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(
                            f"failed at {index}", pb_utils.TritonError.INVALID_ARG
                        )
                    )
                )
                continue
            sender.send(
                pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor("OUT", np.array([value], dtype=np.int32)),
                        pb_utils.Tensor("IDX", np.array([index], dtype=np.int32)),
                    ]
                )
            )
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self):
        for thread in self.threads:
            thread.join()
