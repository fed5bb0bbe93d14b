"""The queue of a dynamically batched model version, with Triton's priorities and queue policies.

`dynamic_batching { priority_levels: N default_priority_level: D default_queue_policy {...}
priority_queue_policy { key: level value {...} } }`: level 1 is served first; a request's
`priority` parameter picks its level (0, or one past N, means D). Each level has a policy:
`max_queue_size` (0: unbounded), a queue timeout (`default_timeout_microseconds`, which a
request's own `timeout` may shorten when `allow_timeout_override` is set), and what happens when
it passes while the request still waits: REJECT (it fails) or DELAY (it is served after every
request of its level that is still on time). Pure bookkeeping: the scheduler owns the timers.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from opserve.errors import UnavailableError
from opserve.proto import ModelConfig, model_config_pb2

T = TypeVar("T")

_DELAY = model_config_pb2.ModelQueuePolicy.DELAY


@dataclass(frozen=True)
class QueuePolicy:
    delay: bool = False  # timeout action: DELAY (else REJECT)
    default_timeout_us: int = 0  # 0: no queue timeout
    allow_timeout_override: bool = False
    max_queue_size: int = 0  # 0: unbounded

    @classmethod
    def from_proto(cls, policy: model_config_pb2.ModelQueuePolicy) -> QueuePolicy:
        return cls(
            policy.timeout_action == _DELAY,
            policy.default_timeout_microseconds,
            policy.allow_timeout_override,
            policy.max_queue_size,
        )

    def timeout_us(self, requested_us: int) -> int:
        """A queued request's timeout, as Triton computes it: the request's own only when the
        policy allows an override and it is shorter (0: none)."""
        if self.allow_timeout_override and 0 < requested_us < self.default_timeout_us:
            return requested_us
        return self.default_timeout_us


def priority_problems(config: ModelConfig) -> list[str]:
    """Triton's rules for `priority_levels`, `default_priority_level` and
    `priority_queue_policy`, with its wording."""
    batching = config.dynamic_batching
    levels = batching.priority_levels
    if levels == 0:
        if batching.default_priority_level or batching.priority_queue_policy:
            return [
                f"default_priority_level and priority_queue_policy of model '{config.name}' "
                "need priority_levels"
            ]
        return []
    problems = []
    if not 1 <= batching.default_priority_level <= levels:
        problems.append(f"default priority level must be in range [1, {levels}] for {config.name}")
    if any(not 1 <= level <= levels for level in batching.priority_queue_policy):
        problems.append(
            f"priority queue policy must have priority level in range [1, {levels}] for "
            f"{config.name}"
        )
    return problems


class RequestQueue(Generic[T]):
    """Requests in the order they are to be served: by level, then on time before delayed,
    then by arrival."""

    def __init__(
        self,
        levels: int = 0,
        default_level: int = 0,
        default_policy: QueuePolicy | None = None,
        policies: dict[int, QueuePolicy] | None = None,
    ) -> None:
        self.levels = levels
        self.default_level = default_level if levels else 0
        default_policy = default_policy or QueuePolicy()
        numbers = range(1, levels + 1) if levels else (0,)
        self.policies = {n: (policies or {}).get(n, default_policy) for n in numbers}
        self._on_time: dict[int, deque[T]] = {n: deque() for n in numbers}
        self._delayed: dict[int, deque[T]] = {n: deque() for n in numbers}
        # every queue in serving order, fixed once (walked several times per request)
        self._ordered = tuple(q for n in numbers for q in (self._on_time[n], self._delayed[n]))
        self._size = 0

    @classmethod
    def for_config(cls, config: ModelConfig) -> RequestQueue[T]:
        batching = config.dynamic_batching
        return cls(
            batching.priority_levels,
            batching.default_priority_level,
            QueuePolicy.from_proto(batching.default_queue_policy),
            {n: QueuePolicy.from_proto(p) for n, p in batching.priority_queue_policy.items()},
        )

    def level(self, priority: int) -> int:
        """The level a request's `priority` asks for (Triton: 0 or out of range -> default)."""
        if not self.levels or priority == 0 or priority > self.levels:
            return self.default_level
        return priority

    def push(self, item: T, level: int) -> QueuePolicy:
        """Queue `item` at `level` (from `level()`); the level's policy, for its timeout."""
        policy = self.policies[level]
        queued = len(self._on_time[level]) + len(self._delayed[level])
        if policy.max_queue_size and queued >= policy.max_queue_size:
            raise UnavailableError("Exceeds maximum queue size")
        self._on_time[level].append(item)
        self._size += 1
        return policy

    def expire(self, item: T, level: int) -> bool:
        """`item`'s queue timeout passed: with DELAY it moves behind its level's on-time
        requests; with REJECT it leaves the queue. True when it was rejected (the caller fails
        it); False when delayed or no longer queued."""
        try:
            self._on_time[level].remove(item)
        except ValueError:
            return False
        if self.policies[level].delay:
            self._delayed[level].append(item)
            return False
        self._size -= 1
        return True

    def __iter__(self) -> Iterator[T]:
        for queue in self._ordered:
            yield from queue

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def first(self) -> T:
        for queue in self._ordered:
            if queue:
                return queue[0]
        raise IndexError("the queue is empty")

    def drop_leading(self, unwanted: Callable[[T], bool]) -> None:
        """Forget the items at the head, in serving order, for which `unwanted` is true."""
        for queue in self._ordered:
            while queue:
                if not unwanted(queue[0]):
                    return
                queue.popleft()
                self._size -= 1

    def take(self, chosen: Callable[[T], bool]) -> list[T]:
        """Remove and return, in serving order, the items `chosen` accepts (it is asked in
        serving order, so it may count what it has accepted)."""
        taken: list[T] = []
        for queues in self._ordered:
            kept: deque[T] = deque()
            for item in queues:
                (taken if chosen(item) else kept).append(item)
            queues.clear()
            queues.extend(kept)
        self._size -= len(taken)
        return taken

    def clear(self) -> list[T]:
        items = list(self)
        for queue in self._ordered:
            queue.clear()
        self._size = 0
        return items
