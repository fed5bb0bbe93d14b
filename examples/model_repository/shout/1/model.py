"""Shouts a sentence: Python pre- and post-processing around the custom-op model `text_ops`."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        pb_utils.Logger.log_info(f"{args['model_name']} ready in {args['model_repository']}")

    def execute(self, requests):
        responses = []
        for request in requests:
            sentence = pb_utils.get_input_tensor_by_name(request, "SENTENCE").as_numpy()[0]
            words = [w.strip(".,;:!?") for w in sentence.decode("utf-8").split()] or [""]
            call = pb_utils.InferenceRequest(
                model_name="text_ops",
                inputs=[pb_utils.Tensor("TEXT", np.array([words], dtype=np.object_))],
                requested_output_names=["UPPER", "LENGTH"],
            )
            answer = call.exec()
            if answer.has_error():
                responses.append(pb_utils.InferenceResponse(error=answer.error()))
                continue
            upper = pb_utils.get_output_tensor_by_name(answer, "UPPER").as_numpy()[0]
            length = pb_utils.get_output_tensor_by_name(answer, "LENGTH").as_numpy()[0]
            longest = upper[int(np.argmax(length))]
            responses.append(
                pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor(
                            "SHOUTED", np.array([b" ".join(upper) + b"!"], dtype=np.object_)
                        ),
                        pb_utils.Tensor("LONGEST", np.array([longest], dtype=np.object_)),
                        pb_utils.Tensor("LETTERS", np.array([int(length.sum())], dtype=np.int64)),
                    ]
                )
            )
        return responses
