"""Reports the version of a package found only in its own execution environment, and the
interpreter that runs it."""

import sys

import numpy as np
import opserve_env_probe
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        version = np.array([opserve_env_probe.__version__], dtype=np.object_)
        executable = np.array([sys.executable], dtype=np.object_)
        return [
            pb_utils.InferenceResponse(
                [pb_utils.Tensor("VERSION", version), pb_utils.Tensor("EXECUTABLE", executable)]
            )
            for _ in requests
        ]
