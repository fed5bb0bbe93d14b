"""Merging a batch of requests' inputs along dimension 0, and splitting outputs back: pure
functions over numpy arrays, used inside a worker.

The server writes a batch's tensors input by input, request after request, into one stretch of
the shared-memory ring, so the requests' arrays for one input usually lie end to end in memory;
merging them is then a view over the whole stretch, not a copy.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from opserve.errors import InternalError, InvalidArgumentError


def adjacent(arrays: list[np.ndarray]) -> bool:
    """Whether the arrays are C-contiguous, of one dtype, and lie end to end in memory."""
    first = arrays[0]
    if first.dtype == np.object_:
        return False
    address = first.__array_interface__["data"][0]
    for array in arrays:
        if (
            array.dtype != first.dtype
            or not array.flags.c_contiguous
            or array.__array_interface__["data"][0] != address
        ):
            return False
        address += array.nbytes
    return True


def merge_inputs(batch: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The batch's inputs concatenated along dimension 0 (a view where they lie end to end)."""
    merged: dict[str, np.ndarray] = {}
    for name, first in batch[0].items():
        try:
            arrays = [inputs[name] for inputs in batch]
        except KeyError:
            raise InvalidArgumentError(
                f"input '{name}' is missing from some requests of the batch"
            ) from None
        rest = first.shape[1:]
        if any(a.ndim == 0 or a.shape[1:] != rest for a in arrays):
            raise InvalidArgumentError(
                f"input '{name}' has shapes that cannot be batched: "
                f"{[list(a.shape) for a in arrays]}"
            )
        total = sum(a.shape[0] for a in arrays)
        if adjacent(arrays):
            merged[name] = as_strided(
                first, shape=(total, *rest), strides=first.strides, writeable=False
            )
        else:
            merged[name] = np.concatenate(arrays)
    return merged


def split_outputs(outputs: dict[str, np.ndarray], sizes: list[int]) -> list[dict[str, np.ndarray]]:
    """Each request's rows of the batched outputs, by its batch size (views, not copies)."""
    total = sum(sizes)
    shares: list[dict[str, np.ndarray]] = [{} for _ in sizes]
    for name, array in outputs.items():
        array = np.asarray(array)
        if array.ndim == 0 or array.shape[0] != total:
            raise InternalError(
                f"output '{name}' has shape {list(array.shape)}, but the batch holds {total}"
            )
        start = 0
        for share, size in zip(shares, sizes, strict=True):
            share[name] = array[start : start + size]
            start += size
    return shares
