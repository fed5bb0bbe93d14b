"""Decoupled with an async execute: counts up every 50 ms until its client goes away
(`is_cancelled`), then logs how far it got. Async executes of a decoupled model overlap, so two
streams tick side by side on one instance."""

import asyncio

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    async def execute(self, requests):
        for request in requests:
            tag = pb_utils.get_input_tensor_by_name(request, "TAG").as_numpy()[0].decode()
            sender = request.get_response_sender()
            count = 0
            while not request.is_cancelled() and count < 600:
                sender.send(
                    pb_utils.InferenceResponse(
                        [pb_utils.Tensor("COUNT", np.array([count], dtype=np.int32))]
                    )
                )
                count += 1
                await asyncio.sleep(0.05)
            state = "cancelled" if sender.is_cancelled() else "finished"
            pb_utils.Logger.log_info(f"ticker {tag} {state} after {count}")
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
