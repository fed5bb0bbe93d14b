"""BLS from an async execute: calls TARGET twice concurrently and adds the answers
(OUTPUT0 = TARGET(INPUT0) + TARGET(INPUT0))."""

import asyncio

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    async def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            target = pb_utils.get_input_tensor_by_name(request, "TARGET").as_numpy()[0].decode()
            calls = [
                pb_utils.InferenceRequest(
                    model_name=target,
                    inputs=[pb_utils.Tensor("INPUT0", x)],
                    requested_output_names=["OUTPUT0"],
                ).async_exec()
                for _ in range(2)
            ]
            answers = await asyncio.gather(*calls)
            errors = [a.error().message() for a in answers if a.has_error()]
            if errors:
                out, error = np.zeros_like(x), errors[0]
            else:
                parts = [
                    pb_utils.get_output_tensor_by_name(a, "OUTPUT0").as_numpy() for a in answers
                ]
                out, error = parts[0] + parts[1], ""
            responses.append(
                pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor("OUTPUT0", out.astype(np.float32)),
                        pb_utils.Tensor("ERROR", np.array([error], dtype=np.object_)),
                    ]
                )
            )
        return responses
