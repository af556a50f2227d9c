"""CloudWatch Embedded Metric Format lines, written to the log stream (stderr).

In ECS the daemon re-logs the child's stderr; infra/logback.xml unwraps those lines so
CloudWatch Logs sees each EMF document whole and turns it into metrics.

Per batch a child writes one document for its shard (dimension Shard) and one per route
the batch touched (dimension sets [Shard, Route] and [Route]), never one per record: a
10,000-record batch costs a handful of log lines. A child also writes one ChildStarts
document when the daemon initializes it.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import TextIO

import orjson

from orders_cdc.outcomes import Outcome, RecordResult

NAMESPACE = "OrdersCdc"
# The EMF specification's limits: metric definitions per directive, values per metric.
MAX_METRICS = 100
MAX_VALUES = 100

Value = float | int | Sequence[float]


def emf(
    metrics: Mapping[str, Value],
    dimensions: Mapping[str, str],
    units: Mapping[str, str] | None = None,
    stream: TextIO | None = None,
    dimension_sets: Sequence[Sequence[str]] | None = None,
    **properties: object,
) -> None:
    """Write one EMF document. `dimension_sets` (default: every dimension, one set) are
    lists of names of `dimensions`; each set makes CloudWatch keep a metric of its own."""
    if len(metrics) > MAX_METRICS:
        raise ValueError(f"{len(metrics)} metrics in one EMF document (at most {MAX_METRICS})")
    for name, value in metrics.items():
        if not isinstance(value, (int, float)) and len(value) > MAX_VALUES:
            raise ValueError(f"metric {name} has {len(value)} values (at most {MAX_VALUES}): use quantiles()")
    units = units or {}
    sets = [list(s) for s in dimension_sets] if dimension_sets is not None else [list(dimensions)]
    document = {
        "_aws": {
            "Timestamp": int(time.time() * 1000),
            "CloudWatchMetrics": [
                {
                    "Namespace": NAMESPACE,
                    "Dimensions": sets,
                    "Metrics": [{"Name": name, "Unit": units.get(name, "Count")} for name in metrics],
                }
            ],
        },
        **dimensions,
        **{name: value if isinstance(value, (int, float)) else list(value) for name, value in metrics.items()},
        **properties,
    }
    out = stream or sys.stderr
    out.write(orjson.dumps(document).decode() + "\n")
    out.flush()


def quantiles(values: Sequence[float], n: int = MAX_VALUES) -> list[float]:
    """At most n values that keep the distribution: all of them when there are few, else n
    evenly spaced order statistics (the minimum and the maximum included). CloudWatch's
    percentiles of the result are those of the whole, to within 1/n; its sample count is n,
    which is why the exact number of calls goes out as a metric of its own."""
    if len(values) <= n:
        return list(values)
    ordered = sorted(values)
    last = len(ordered) - 1
    return [ordered[round(i * last / (n - 1))] for i in range(n)]


class RouteStats:
    """What the pipeline sees of each route that the records' outcomes do not say: failed
    attempts that will be tried again, and each handler call's duration. Pool threads add
    to it; the child drains it after each batch (a call abandoned on its timeout that ends
    late lands in a later batch's figures)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._retried: Counter[str] = Counter()
        self._latency_ms: defaultdict[str, list[float]] = defaultdict(list)
        self._circuits: Counter[tuple[str, str]] = Counter()

    def circuit(self, route: str, opened: bool) -> None:
        """The route's circuit breaker opened (an outage began) or closed again."""
        with self._lock:
            self._circuits[(route, "CircuitOpened" if opened else "CircuitClosed")] += 1

    def retried(self, route: str) -> None:
        with self._lock:
            self._retried[route] += 1

    def call(self, route: str, milliseconds: float) -> None:
        with self._lock:
            self._latency_ms[route].append(milliseconds)

    def drain(self) -> tuple[Counter[str], dict[str, list[float]], Counter[tuple[str, str]]]:
        with self._lock:
            retried, latency, circuits = self._retried, dict(self._latency_ms), self._circuits
            self._retried, self._latency_ms, self._circuits = Counter(), defaultdict(list), Counter()
        return retried, latency, circuits


# Per route: the metric for each outcome a route can give a record.
ROUTE_OUTCOMES = {Outcome.DONE: "Done", Outcome.DUPLICATE: "Duplicate", Outcome.STALE: "Stale",
                  Outcome.DEAD_LETTERED: "DeadLettered"}
ROUTE_UNITS = {"HandlerLatency": "Milliseconds"}


def route_metrics(results: Iterable[RecordResult], retried: Mapping[str, int],
                  latency_ms: Mapping[str, Sequence[float]],
                  circuits: Mapping[tuple[str, str], int] | None = None) -> dict[str, dict[str, Value]]:
    """Route -> its metrics for one batch: RecordsIn, Done, Duplicate, Stale, DeadLettered,
    Retried, HandlerCalls, CircuitOpened, CircuitClosed and HandlerLatency (ms, one value
    per call, at most 100)."""
    circuits = circuits or {}
    counts: defaultdict[str, Counter[str]] = defaultdict(Counter)
    for result in results:
        for route, outcome in result.routes:
            counts[route]["RecordsIn"] += 1
            if outcome in ROUTE_OUTCOMES:
                counts[route][ROUTE_OUTCOMES[outcome]] += 1
    # A record dead-lettered on one route may have been only tried (not settled) on another.
    routes = set(counts) | set(retried) | set(latency_ms) | {route for route, _ in circuits}
    out: dict[str, dict[str, Value]] = {}
    for route in sorted(routes):
        c = counts[route]
        metrics: dict[str, Value] = {"RecordsIn": c["RecordsIn"],
                                     **{name: c[name] for name in ROUTE_OUTCOMES.values()},
                                     "Retried": retried.get(route, 0),
                                     "HandlerCalls": len(latency_ms.get(route, ())),
                                     "CircuitOpened": circuits.get((route, "CircuitOpened"), 0),
                                     "CircuitClosed": circuits.get((route, "CircuitClosed"), 0)}
        if latency_ms.get(route):
            metrics["HandlerLatency"] = [round(v, 3) for v in quantiles(latency_ms[route])]
        out[route] = metrics
    return out


def child_started(shard_id: str, stream: TextIO | None = None) -> None:
    """One ChildStarts per initialize: the restart alarm sums it over the namespace."""
    emf({"ChildStarts": 1}, {"Shard": shard_id}, stream=stream)
