"""Custom metrics that models define (the Python backend's `pb_utils.MetricFamily`).

Families are keyed by name; a family's metrics by their labels. A family lives while a worker
that created it lives: when the last such worker ends (its model is unloaded), the family leaves
`/metrics`, as in Triton.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

from opserve.errors import InvalidArgumentError, NotFoundError

KINDS = ("counter", "gauge", "histogram")
Labels = tuple[tuple[str, str], ...]


@dataclass
class Series:
    """One metric: a value, or a histogram's bucket counts, sum and count."""

    value: float = 0.0
    buckets: list[float] = field(default_factory=list)  # upper bounds, sorted
    counts: list[int] = field(default_factory=list)  # per bucket (not cumulative), then +Inf
    total: float = 0.0
    count: int = 0


@dataclass
class Family:
    name: str
    description: str
    kind: str
    series: dict[Labels, Series] = field(default_factory=dict)
    owners: set[object] = field(default_factory=set)


def _labels(raw: Any) -> Labels:
    if not isinstance(raw, dict):
        raise InvalidArgumentError("metric labels must be a dict of strings")
    return tuple(sorted((str(k), str(v)) for k, v in raw.items()))


class CustomMetrics:
    def __init__(self) -> None:
        self.families: dict[str, Family] = {}

    def handle(self, owner: object, arguments: dict[str, Any]) -> Any:
        """One call from a model: `operation` is family, metric, increment, set, observe or
        value."""
        operation = arguments.get("operation")
        name = str(arguments.get("family", ""))
        if operation == "family":
            return self._family(owner, name, str(arguments.get("description", "")), arguments)
        family = self.families.get(name)
        if family is None:
            raise NotFoundError(f"metric family '{name}' does not exist")
        labels = _labels(arguments.get("labels", {}))
        if operation == "metric":
            buckets = arguments.get("buckets")
            if labels not in family.series:
                bounds = sorted(float(b) for b in buckets or [])
                family.series[labels] = Series(
                    buckets=bounds, counts=[0] * (len(bounds) + 1) if buckets is not None else []
                )
            return None
        series = family.series.get(labels)
        if series is None:
            raise NotFoundError(f"metric family '{name}' has no metric with labels {dict(labels)}")
        value = float(arguments.get("value", 0.0))
        if operation == "increment":
            series.value += value
        elif operation == "set":
            series.value = value
        elif operation == "observe":
            series.counts[bisect.bisect_left(series.buckets, value)] += 1
            series.total += value
            series.count += 1
        elif operation == "value":
            return series.total if family.kind == "histogram" else series.value
        else:
            raise InvalidArgumentError(f"unknown metric operation '{operation}'")
        return None

    def _family(
        self, owner: object, name: str, description: str, arguments: dict[str, Any]
    ) -> None:
        kind = arguments.get("kind")
        if kind not in KINDS:
            raise InvalidArgumentError(f"unknown metric kind '{kind}'")
        if not name or not name.replace("_", "a").replace(":", "a").isalnum() or name[0].isdigit():
            raise InvalidArgumentError(f"'{name}' is not a valid metric family name")
        if name.startswith("nv_"):
            raise InvalidArgumentError(
                f"metric family names starting with 'nv_' are Triton's own: '{name}'"
            )
        family = self.families.get(name)
        if family is None:
            family = self.families[name] = Family(name, description, kind)
        elif family.kind != kind:
            raise InvalidArgumentError(
                f"metric family '{name}' already exists as a {family.kind}, not a {kind}"
            )
        family.owners.add(owner)

    def release(self, owner: object) -> None:
        """A worker ended: families that only it held go away."""
        for name, family in list(self.families.items()):
            family.owners.discard(owner)
            if not family.owners:
                del self.families[name]
