"""A sequence accumulator driven by the sequence batcher's inputs: the control tensors (START,
END, READY, CORRID) keep a running total per correlation id inside the model (OUTPUT), and the
implicit state INPUT_STATE -> OUTPUT_STATE keeps another one in the server (FROM_STATE).
CONTROLS echoes [start, end, ready] as the model saw them; BATCH is [requests in this execute,
null requests among them]; null requests (READY false) get zeros and change nothing. An INPUT of -999 ends the process (a crash mid-sequence)."""

import os

import numpy as np
import triton_python_backend_utils as pb_utils


def _scalar(request, name):
    return pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)[0]


class TritonPythonModel:
    def initialize(self, args):
        self.totals = {}

    def execute(self, requests):
        responses = []
        nulls = sum(not _scalar(r, "READY") for r in requests)
        for request in requests:
            value = pb_utils.get_input_tensor_by_name(request, "INPUT").as_numpy()
            state = pb_utils.get_input_tensor_by_name(request, "INPUT_STATE").as_numpy()
            start, end = _scalar(request, "START"), _scalar(request, "END")
            ready, corrid = _scalar(request, "READY"), _scalar(request, "CORRID")
            controls = np.array([int(start), int(end), int(ready)], dtype=np.int32)
            if ready and int(value.reshape(-1)[0]) == -999:
                os._exit(1)
            if not ready:
                total = np.zeros_like(value)
                new_state = state
            else:
                if start:
                    self.totals[corrid] = np.zeros_like(value)
                self.totals[corrid] = self.totals[corrid] + value
                total = self.totals[corrid]
                if end:
                    del self.totals[corrid]
                new_state = state + value
            responses.append(
                pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor("OUTPUT", total.astype(np.int32)),
                        pb_utils.Tensor("FROM_STATE", new_state.astype(np.int32)),
                        pb_utils.Tensor("CONTROLS", controls.reshape(value.shape[:-1] + (3,))),
                        pb_utils.Tensor(
                            "BATCH",
                            np.array([len(requests), nulls], np.int32).reshape(
                                value.shape[:-1] + (2,)
                            ),
                        ),
                        pb_utils.Tensor("OUTPUT_STATE", new_state.astype(np.int32)),
                    ]
                )
            )
        return responses
