"""Custom metrics: counts requests, keeps the last value in a gauge, observes values in a
histogram, and answers with the counter's own value()."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        labels = {"model": args["model_name"], "version": args["model_version"]}
        self.requests = pb_utils.MetricFamily(
            "opserve_test_requests", "Requests seen by the model", pb_utils.MetricFamily.COUNTER
        ).Metric(labels=labels)
        self.last = pb_utils.MetricFamily(
            "opserve_test_last_value", "The last value seen", pb_utils.MetricFamily.GAUGE
        ).Metric(labels=labels)
        self.values = pb_utils.MetricFamily(
            "opserve_test_values", "Values seen", pb_utils.MetricFamily.HISTOGRAM
        ).Metric(labels=labels, buckets=[1.0, 10.0])
        pb_utils.Logger.log_info("metrics model initialized")

    def execute(self, requests):
        responses = []
        for request in requests:
            value = float(pb_utils.get_input_tensor_by_name(request, "VALUE").as_numpy()[0])
            self.requests.increment(1)
            self.last.set(value)
            self.values.observe(value)
            pb_utils.Logger.log_warn(f"metrics model saw {value}")
            total = np.array([self.requests.value()], dtype=np.float64)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("TOTAL", total)]))
        return responses
