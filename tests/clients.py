"""Small helpers for talking to a server with tritonclient in tests."""

from __future__ import annotations

import numpy as np
import tritonclient.http as httpclient


def infer_input(
    name: str, array: np.ndarray, datatype: str, binary: bool = True
) -> httpclient.InferInput:
    tensor = httpclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def simple_inputs(binary: bool = True, batch: int = 1):
    """Inputs for Triton's `simple` model: (INPUT0, INPUT1, the tritonclient inputs)."""
    a = np.arange(16 * batch, dtype=np.int32).reshape(batch, 16)
    b = np.full((batch, 16), 3, dtype=np.int32)
    return (
        a,
        b,
        [infer_input("INPUT0", a, "INT32", binary), infer_input("INPUT1", b, "INT32", binary)],
    )


def simple_answers(client: httpclient.InferenceServerClient) -> bool:
    """Whether the `simple` model answers a request correctly."""
    a, b, inputs = simple_inputs()
    result = client.infer("simple", inputs)
    return bool(
        (result.as_numpy("OUTPUT0") == a + b).all() and (result.as_numpy("OUTPUT1") == a - b).all()
    )
