"""Custom metric families as models define them: pure bookkeeping, no server."""

from __future__ import annotations

import pytest

from opserve.custom_metrics import CustomMetrics
from opserve.errors import InvalidArgumentError, NotFoundError


def call(metrics: CustomMetrics, owner: object, operation: str, **arguments):
    return metrics.handle(owner, {"operation": operation, **arguments})


def test_counter_gauge_and_histogram() -> None:
    metrics = CustomMetrics()
    labels = {"model": "m"}
    for name, kind in (("c", "counter"), ("g", "gauge"), ("h", "histogram")):
        call(metrics, "w", "family", family=name, description="d", kind=kind)
    call(metrics, "w", "metric", family="c", labels=labels)
    call(metrics, "w", "metric", family="g", labels=labels)
    call(metrics, "w", "metric", family="h", labels=labels, buckets=[10.0, 1.0])
    call(metrics, "w", "increment", family="c", labels=labels, value=2)
    call(metrics, "w", "increment", family="c", labels=labels, value=3)
    call(metrics, "w", "set", family="g", labels=labels, value=7)
    for value in (0.5, 1.0, 5.0, 50.0):
        call(metrics, "w", "observe", family="h", labels=labels, value=value)
    assert call(metrics, "w", "value", family="c", labels=labels) == 5.0
    assert call(metrics, "w", "value", family="g", labels=labels) == 7.0
    series = metrics.families["h"].series[(("model", "m"),)]
    assert series.buckets == [1.0, 10.0]
    assert series.counts == [2, 1, 1]  # <= 1, <= 10, +Inf
    assert series.count == 4 and series.total == 56.5


def test_a_family_lives_while_a_worker_that_made_it_lives() -> None:
    metrics = CustomMetrics()
    call(metrics, "a", "family", family="x", description="", kind="counter")
    call(metrics, "b", "family", family="x", description="", kind="counter")
    metrics.release("a")
    assert "x" in metrics.families
    metrics.release("b")
    assert "x" not in metrics.families


def test_mistakes_are_clear_errors() -> None:
    metrics = CustomMetrics()
    call(metrics, "w", "family", family="x", description="", kind="counter")
    with pytest.raises(InvalidArgumentError, match="already exists as a counter"):
        call(metrics, "w", "family", family="x", description="", kind="gauge")
    with pytest.raises(InvalidArgumentError, match="Triton's own"):
        call(metrics, "w", "family", family="nv_mine", description="", kind="gauge")
    with pytest.raises(InvalidArgumentError, match="not a valid"):
        call(metrics, "w", "family", family="has space", description="", kind="gauge")
    with pytest.raises(NotFoundError, match="no metric with labels"):
        call(metrics, "w", "increment", family="x", labels={"a": "b"}, value=1)
    with pytest.raises(NotFoundError, match="does not exist"):
        call(metrics, "w", "value", family="y", labels={})
