"""Fails in the way MODE asks: raise, too many responses, a wrong type, a TritonError response,
a crash of the whole process, a hang, a wait for its client to go away (until_cancelled), or an
answer (ok; sender: through the response sender)."""

import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        mode = pb_utils.get_input_tensor_by_name(requests[0], "MODE").as_numpy()[0].decode()
        ok = pb_utils.InferenceResponse(
            [pb_utils.Tensor("OUT", np.array([os.getpid()], dtype=np.int32))]
        )
        if mode == "raise":
            return [1 / 0 for _ in requests]
        if mode == "too_many":
            return [ok, ok]
        if mode == "wrong_type":
            return ["not a response"]
        if mode == "none":
            return None
        if mode == "error":
            return [
                pb_utils.InferenceResponse(
                    error=pb_utils.TritonError("no such thing", pb_utils.TritonError.NOT_FOUND)
                )
            ]
        if mode == "crash":
            os.abort()
        if mode == "hang":
            time.sleep(3600)
        if mode == "until_cancelled":  # its client goes away (or 30 s pass)
            pb_utils.Logger.log_info("faulty waits for a cancellation")
            deadline = time.monotonic() + 30
            while not requests[0].is_cancelled() and time.monotonic() < deadline:
                time.sleep(0.01)
            pb_utils.Logger.log_info(f"faulty cancelled={requests[0].is_cancelled()}")
            return [ok for _ in requests]
        if mode == "sender":  # a model that is not decoupled may answer through the sender too
            requests[0].get_response_sender().send(
                ok, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
            )
            return [None]
        return [ok for _ in requests]
