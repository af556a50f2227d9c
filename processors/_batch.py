"""Per-change bookkeeping for batch handlers: one bad change must not fail its neighbours."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from orders_cdc.change import ChangeRecord
from orders_cdc.errors import PartialBatchFailure

T = TypeVar("T")


def each(
    changes: Sequence[ChangeRecord], fn: Callable[[ChangeRecord], T], failures: dict[int, BaseException]
) -> dict[int, T]:
    """{index: fn(change)} for the changes where fn succeeds; the others go to ``failures``."""
    results: dict[int, T] = {}
    for i, change in enumerate(changes):
        try:
            results[i] = fn(change)
        except Exception as exc:  # noqa: BLE001 - reported per change, classified by the pipeline
            failures[i] = exc
    return results


def raise_failures(failures: dict[int, BaseException]) -> None:
    if failures:
        raise PartialBatchFailure(failures)
