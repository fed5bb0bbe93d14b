"""Calls a PyTorch custom op from model.py: the library in model_operations is loaded before
initialize, so torch.ops.my_ops.add_one exists."""

import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.add_one = torch.ops.my_ops.add_one

    def execute(self, requests):
        responses = []
        for request in requests:
            x = torch.from_dlpack(pb_utils.get_input_tensor_by_name(request, "INPUT0").to_dlpack())
            y = self.add_one(x)
            responses.append(
                pb_utils.InferenceResponse([pb_utils.Tensor.from_dlpack("OUTPUT0", y)])
            )
        return responses
