"""Priority levels and queue policies of the dynamic batcher's queue (opserve/queues.py)."""

from __future__ import annotations

import pytest

from opserve.config.pbtxt import parse_model_config
from opserve.errors import UnavailableError
from opserve.queues import QueuePolicy, RequestQueue, priority_problems


def test_priority_picks_the_level_and_out_of_range_means_the_default() -> None:
    queue: RequestQueue[str] = RequestQueue(levels=3, default_level=2)
    assert [queue.level(p) for p in (0, 1, 2, 3, 4, 99)] == [2, 1, 2, 3, 2, 2]
    assert RequestQueue[str]().level(5) == 0  # no levels: one queue


def test_levels_are_served_in_order_then_arrival() -> None:
    queue: RequestQueue[str] = RequestQueue(levels=2, default_level=2)
    for item, priority in [("a", 2), ("b", 1), ("c", 0), ("d", 1)]:
        queue.push(item, queue.level(priority))
    assert list(queue) == ["b", "d", "a", "c"] and len(queue) == 4


def test_a_level_full_refuses_with_tritons_message() -> None:
    policy = QueuePolicy(max_queue_size=1)
    queue: RequestQueue[str] = RequestQueue(2, 1, QueuePolicy(), {2: policy})
    queue.push("a", 2)
    queue.push("b", 1)
    queue.push("c", 1)  # level 1 has no bound
    with pytest.raises(UnavailableError, match="^Exceeds maximum queue size$"):
        queue.push("d", 2)


@pytest.mark.parametrize(
    "policy, requested, expected",
    [
        (QueuePolicy(default_timeout_us=100), 50, 100),  # no override allowed
        (QueuePolicy(default_timeout_us=100, allow_timeout_override=True), 50, 50),
        (
            QueuePolicy(default_timeout_us=100, allow_timeout_override=True),
            500,
            100,
        ),  # only shorter
        (QueuePolicy(default_timeout_us=0, allow_timeout_override=True), 50, 0),  # Triton: none
        (QueuePolicy(default_timeout_us=100, allow_timeout_override=True), 0, 100),
    ],
)
def test_queue_timeout_follows_tritons_override_rule(
    policy: QueuePolicy, requested: int, expected: int
) -> None:
    assert policy.timeout_us(requested) == expected


def test_expired_requests_are_rejected_or_delayed_behind_their_level() -> None:
    delay = QueuePolicy(delay=True, default_timeout_us=1)
    queue: RequestQueue[str] = RequestQueue(2, 2, QueuePolicy(default_timeout_us=1), {1: delay})
    for item, level in [("a1", 1), ("b1", 1), ("a2", 2), ("b2", 2)]:
        queue.push(item, level)
    assert queue.expire("a1", 1) is False  # delayed: after b1, still before level 2
    assert queue.expire("a2", 2) is True  # rejected: gone
    assert queue.expire("a2", 2) is False  # no longer queued
    assert list(queue) == ["b1", "a1", "b2"] and len(queue) == 3


def test_take_keeps_the_order_of_what_stays() -> None:
    queue: RequestQueue[int] = RequestQueue(levels=2, default_level=1)
    for item, level in [(1, 2), (2, 1), (3, 2), (4, 1)]:
        queue.push(item, level)
    assert queue.take(lambda item: item % 2 == 0) == [2, 4]
    assert list(queue) == [1, 3] and len(queue) == 2
    queue.drop_leading(lambda item: item == 1)
    assert list(queue) == [3] and queue.clear() == [3] and not queue


@pytest.mark.parametrize(
    "batching, problem",
    [
        ("priority_levels: 2 default_priority_level: 1", None),
        ("priority_levels: 2", "default priority level must be in range [1, 2] for m"),
        ("priority_levels: 2 default_priority_level: 3", "default priority level must be in range"),
        (
            "priority_levels: 2 default_priority_level: 1 priority_queue_policy { key: 3 value {} }",
            "priority queue policy must have priority level in range [1, 2] for m",
        ),
        ("default_priority_level: 1", "need priority_levels"),
    ],
)
def test_priority_rules(batching: str, problem: str | None) -> None:
    config = parse_model_config(f'name: "m" max_batch_size: 4 dynamic_batching {{ {batching} }}')
    problems = priority_problems(config)
    assert (problem is None and problems == []) or (problem is not None and problem in problems[0])
