"""Sum and difference of two FP32 vectors; also says how many requests shared its execute call
and which initialize arguments it was given."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.args = args
        config = json.loads(args["model_config"])
        output0 = pb_utils.get_output_config_by_name(config, "OUTPUT0")
        self.dtype = pb_utils.triton_string_to_numpy(output0["data_type"])
        self.finalized = False

    def execute(self, requests):
        responses = []
        for request in requests:
            a = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            b = pb_utils.get_input_tensor_by_name(request, "INPUT1").as_numpy()
            rows = a.shape[0]
            args = json.dumps(
                {
                    **self.args,
                    "request_id": request.request_id(),
                    "parameters": json.loads(request.parameters()),
                    "requested": sorted(request.requested_output_names()),
                }
            )
            responses.append(
                pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor("OUTPUT0", (a + b).astype(self.dtype)),
                        pb_utils.Tensor("OUTPUT1", (a - b).astype(self.dtype)),
                        pb_utils.Tensor("BATCH", np.full((rows, 1), len(requests), dtype=np.int32)),
                        pb_utils.Tensor("ARGS", np.array([[args]] * rows, dtype=np.object_)),
                    ]
                )
            )
        return responses

    def finalize(self):
        pb_utils.Logger.log_info("add_sub finalized")
