"""Worker-side batch merge and split: pure functions, no server."""

from __future__ import annotations

import numpy as np
import pytest

from opserve.batching import adjacent, merge_inputs, split_outputs
from opserve.errors import InternalError, InvalidArgumentError


def test_arrays_end_to_end_in_one_buffer_merge_without_a_copy() -> None:
    buffer = np.arange(24, dtype=np.float32)
    first, second = buffer[:8].reshape(2, 4), buffer[8:20].reshape(3, 4)
    assert adjacent([first, second])
    merged = merge_inputs([{"X": first}, {"X": second}])["X"]
    assert merged.shape == (5, 4)
    assert np.shares_memory(merged, buffer)
    np.testing.assert_array_equal(merged, buffer[:20].reshape(5, 4))


def test_arrays_apart_are_concatenated() -> None:
    first = np.ones((1, 3), dtype=np.int32)
    second = np.zeros((2, 3), dtype=np.int32)
    assert not adjacent([first, second])
    merged = merge_inputs([{"X": first}, {"X": second}])["X"]
    np.testing.assert_array_equal(merged, np.array([[1, 1, 1], [0, 0, 0], [0, 0, 0]]))


def test_bytes_tensors_concatenate() -> None:
    first = np.array([[b"a"]], dtype=np.object_)
    second = np.array([[b"b"], [b"c"]], dtype=np.object_)
    merged = merge_inputs([{"S": first}, {"S": second}])["S"]
    assert merged.reshape(-1).tolist() == [b"a", b"b", b"c"]


def test_unequal_shapes_past_the_batch_dimension_are_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="cannot be batched"):
        merge_inputs([{"X": np.zeros((1, 3))}, {"X": np.zeros((1, 4))}])
    with pytest.raises(InvalidArgumentError, match="missing"):
        merge_inputs([{"X": np.zeros((1, 3))}, {"Y": np.zeros((1, 3))}])


def test_outputs_split_back_by_batch_size_as_views() -> None:
    output = np.arange(12).reshape(6, 2)
    shares = split_outputs({"Y": output}, [1, 3, 2])
    assert [s["Y"].shape for s in shares] == [(1, 2), (3, 2), (2, 2)]
    assert all(np.shares_memory(s["Y"], output) for s in shares)
    np.testing.assert_array_equal(np.concatenate([s["Y"] for s in shares]), output)


def test_an_output_without_the_batch_is_an_internal_error() -> None:
    with pytest.raises(InternalError, match="batch holds 3"):
        split_outputs({"Y": np.zeros((2, 2))}, [1, 2])
