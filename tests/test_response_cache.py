"""The response cache's key, its byte bound and its flag (opserve/response_cache.py)."""

from __future__ import annotations

import pytest

from opserve.inference import InferenceRequest, InferenceResponse, Tensor
from opserve.response_cache import (
    ENTRY_OVERHEAD,
    CacheSettings,
    ResponseCache,
    cache_key,
    parse_cache_config,
)


def request(data: bytes = b"\0" * 8, shape=(2,), outputs=None, **parameters) -> InferenceRequest:
    return InferenceRequest(
        "m", "", [Tensor("X", "FP32", shape, data)], outputs, parameters=parameters
    )


def response(nbytes: int) -> InferenceResponse:
    return InferenceResponse("m", "1", [Tensor("Y", "UINT8", (nbytes,), memoryview(bytes(nbytes)))])


def test_the_key_covers_everything_that_decides_a_response() -> None:
    base = cache_key(request(), "m", 1)
    assert cache_key(request(), "m", 1) == base
    variants = [
        cache_key(request(b"\1" + b"\0" * 7), "m", 1),
        cache_key(request(shape=(1, 2)), "m", 1),
        cache_key(request(outputs=["Y"]), "m", 1),
        cache_key(request(flag=True), "m", 1),
        cache_key(request(), "m", 2),
        cache_key(request(), "n", 1),
    ]
    assert len({base, *variants}) == 7


def test_least_recently_used_entries_go_first_within_the_byte_bound() -> None:
    cache = ResponseCache(capacity=3 * (ENTRY_OVERHEAD + 100))
    for key in (b"a", b"b", b"c"):
        assert cache.put(key, response(100))
    assert cache.get(b"a") is not None  # a is now the most recently used
    cache.put(b"d", response(100))
    assert cache.get(b"b") is None and len(cache) == 3
    assert cache.used <= cache.capacity
    hit = cache.get(b"a")
    assert hit is not None and bytes(hit.outputs[0].data) == bytes(100)


def test_a_response_larger_than_the_cache_is_not_kept() -> None:
    cache = ResponseCache(capacity=ENTRY_OVERHEAD + 10)
    assert not cache.put(b"a", response(11))
    assert len(cache) == 0 and cache.used == 0


@pytest.mark.parametrize(
    "values, expected",
    [
        ([], None),
        (["local,size=1048576"], CacheSettings(1048576)),
        (["local,size=0"], CacheSettings(0)),
    ],
)
def test_cache_config_flags(values: list[str], expected: CacheSettings | None) -> None:
    assert parse_cache_config(values) == expected


@pytest.mark.parametrize(
    "value, message",
    [
        ("redis,host=localhost", "cache 'redis' is not available"),
        ("local,capacity=10", "no setting 'capacity'"),
        ("local,size", "must read <cache>,<key>=<value>"),
        ("local,size=lots", "whole number of bytes"),
    ],
)
def test_bad_cache_config_flags_are_clear_errors(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_cache_config([value])
