"""Triton's generate extension: request and response JSON, no server."""

from __future__ import annotations

import json

import numpy as np
import pytest

from opserve.errors import InvalidArgumentError
from opserve.frontends.http.generate import (
    decode_generate,
    encode_generate,
    generate_shape,
    server_sent_event,
)
from opserve.inference import InferenceResponse, Tensor
from opserve.schema import ModelSchema, TensorSchema

SCHEMA = ModelSchema(
    4,
    {
        "text_input": TensorSchema("text_input", "BYTES", (-1,), None),
        "max_tokens": TensorSchema("max_tokens", "INT32", (1,), None),
    },
    {"text_output": TensorSchema("text_output", "BYTES", (-1,), None)},
)


def test_keys_become_inputs_with_a_batch_dimension() -> None:
    body = json.dumps(
        {"text_input": "hello", "max_tokens": 5, "id": "7", "parameters": {"t": 1}}
    ).encode()
    request = decode_generate(body, SCHEMA, "m", "")
    inputs = {t.name: t for t in request.inputs}
    assert inputs["text_input"].shape == (1, 1) and inputs["text_input"].datatype == "BYTES"
    assert inputs["max_tokens"].to_numpy().tolist() == [[5]]
    assert request.id == "7" and request.parameters == {"id": "7", "t": 1}  # as Triton


def test_other_keys_are_parameters_and_wrong_types_are_refused() -> None:
    request = decode_generate(
        b'{"text_input": "a", "stream": false, "parameters": {"max_tokens": 3, "t": 0.5}}',
        SCHEMA,
        "m",
        "",
    )
    assert request.parameters == {"stream": False, "t": 0.5}
    assert sorted(t.name for t in request.inputs) == ["max_tokens", "text_input"]
    with pytest.raises(InvalidArgumentError, match="parameter 'x' has invalid type"):
        decode_generate(b'{"x": [1]}', SCHEMA, "m", "")
    two = decode_generate(b'{"max_tokens": [1, 2]}', SCHEMA, "m", "")
    assert two.inputs[0].shape == (2, 1)  # the batch dimension takes what the dims leave
    with pytest.raises(InvalidArgumentError, match="takes INT32"):
        decode_generate(b'{"max_tokens": "five"}', SCHEMA, "m", "")
    with pytest.raises(InvalidArgumentError, match="JSON object"):
        decode_generate(b"[1]", SCHEMA, "m", "")


def test_responses_are_flat_with_single_elements_as_scalars() -> None:
    response = InferenceResponse(
        "m",
        "1",
        [
            Tensor.from_numpy("text_output", np.array([b"hi"], dtype=object)),
            Tensor.from_numpy("scores", np.array([1.5, 2.5], dtype="float32")),
        ],
    )
    encoded = encode_generate(response)
    assert encoded.index(b'"model_name"') < encoded.index(b'"scores"')  # sorted keys
    body = json.loads(encoded)
    assert body == {
        "model_name": "m",
        "model_version": "1",
        "text_output": "hi",
        "scores": [1.5, 2.5],
    }
    assert server_sent_event(b"{}") == b"data: {}\n\n"


def test_shapes_follow_the_models_dims_as_triton_derives_them() -> None:
    assert generate_shape((-1, 4), 4) == (1, 4)
    assert generate_shape((-1, -1), 3) == (1, 3)
    assert generate_shape((2, -1), 6) == (2, 3)
    assert generate_shape((1,), 1) == (1,)
    assert generate_shape((1,), 2) is None
    assert generate_shape((4,), 6) is None
