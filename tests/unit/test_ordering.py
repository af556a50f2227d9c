"""High-water marks (in memory and on DynamoDB), ordered routes in the pipeline, and
per-key fail-fast: a failing change holds only the later changes of the same order."""

from __future__ import annotations

import uuid

import orjson
import pytest

from orders_cdc.change import decode_kinesis_data
from orders_cdc.deadletter import InMemoryDeadLetterSink
from orders_cdc.errors import PartialBatchFailure, PermanentError, RetryableError
from orders_cdc.idempotency import IdempotencyStoreConfigError, images_digest
from orders_cdc.ordering import (
    DynamoDbHighWaterMarkStore,
    InMemoryHighWaterMarkStore,
    Verdict,
    compare,
    mark_key,
    version,
)
from orders_cdc.pipeline import Outcome, Pipeline
from orders_cdc.retry import RetryPolicy, run_inline
from orders_cdc.routing import Idempotency, Route, Router
from tests.factories import kcl_record, kds_record, sequence_number
from tests.unit.test_idempotency import counting, ddb_client, idempotency_table
from tests.unit.test_pipeline import FakeClock

T0 = 1721011165891550
NOW = 1_900_000_000.0


def doc(order_id, status, us, old_status="processing"):
    return kds_record("MODIFY", new={"order_id": order_id, "status": status},
                      old={"order_id": order_id, "status": old_status}, keys={"order_id": order_id}, created_us=us)


def change(order_id, status, us):
    return decode_kinesis_data(orjson.dumps(doc(order_id, status, us)))


def v(order_id, status, us):
    c = change(order_id, status, us)
    return version(c, images_digest(c))


def test_versions_order_by_time_then_a_deterministic_hash():
    assert v("o", "a", T0) < v("o", "a", T0 + 1)
    assert v("o", "z", 9) < v("o", "a", 10), "time first: zero-padded, not string luck"
    same_time = sorted([v("o", "a", T0), v("o", "b", T0)])
    assert compare(same_time[0], same_time[1]) is Verdict.STALE
    assert compare(same_time[1], same_time[0]) is Verdict.NEWER
    assert compare(v("o", "a", T0), v("o", "a", T0)) is Verdict.DUPLICATE
    assert compare(v("o", "a", T0), None) is Verdict.NEWER


@pytest.fixture(params=["memory", "dynamodb"])
def store(request):
    if request.param == "memory":
        return InMemoryHighWaterMarkStore()
    client = ddb_client(request.getfixturevalue("moto_server"))
    name = idempotency_table(client)
    return DynamoDbHighWaterMarkStore(client, name, ttl_seconds=3600)


def test_marks_only_move_up(store):
    old, new = v("o", "a", T0), v("o", "b", T0 + 5)
    assert store.advance("hwm#r#1", old, NOW)
    assert store.advance("hwm#r#1", new, NOW)
    assert not store.advance("hwm#r#1", old, NOW), "an older change never moves it back"
    assert not store.advance("hwm#r#1", new, NOW), "nor does the same one"
    assert store.get_many(["hwm#r#1", "hwm#r#2"]) == {"hwm#r#1": new}


def test_dynamodb_marks_expire_by_ttl_and_errors_are_mapped(moto_server):
    client = ddb_client(moto_server)
    name = idempotency_table(client)
    DynamoDbHighWaterMarkStore(client, name, ttl_seconds=60).advance("hwm#r#1", "x", NOW)
    item = client.get_item(TableName=name, Key={"id": {"S": "hwm#r#1"}})["Item"]
    assert item["expires_at"] == {"N": str(int(NOW) + 60)}
    with pytest.raises(IdempotencyStoreConfigError):
        DynamoDbHighWaterMarkStore(client, f"missing-{uuid.uuid4().hex[:6]}").advance("k", "x", NOW)


# ---------------------------------------------------------------------------------------------
# Ordered routes in the pipeline


class View:
    """Derived state: the last status applied per order, and every call's changes."""

    def __init__(self, fail=None):
        self.state: dict[str, str] = {}
        self.calls: list[list[tuple[str, str]]] = []
        self.fail = dict(fail or {})  # (order, status) -> [errors to raise, one per attempt]

    def __call__(self, changes, ctx):
        self.calls.append([(c.keys["order_id"], c.new_value("status")) for c in changes])
        failures = {}
        for j, c in enumerate(changes):
            key = (c.keys["order_id"], c.new_value("status"))
            if self.fail.get(key):
                failures[j] = self.fail[key].pop(0)
            else:
                self.state[key[0]] = key[1]
        if failures:
            raise PartialBatchFailure(failures)


def ordered(view, marks=None, dlq=None, attempts=3, **route):
    clock = FakeClock()
    return Pipeline(router=Router([Route("view", "Orders", view, ordered=True, idempotency=Idempotency.OFF, **route)]),
                    ctx=None, dead_letters=dlq if dlq is not None else InMemoryDeadLetterSink(),
                    retry=RetryPolicy(max_attempts=attempts, base_seconds=0, max_seconds=0), sleep=clock.sleep,
                    clock=clock, runner=run_inline, high_water_marks=marks)


def records(*docs, start=1):
    return [kcl_record(d, sequence_number(n)) for n, d in enumerate(docs, start)]


def test_out_of_order_changes_are_stale_and_equal_ones_duplicates():
    view, marks = View(), InMemoryHighWaterMarkStore()
    p = ordered(view, marks)
    results = p.process(records(doc("o-1", "shipped", T0 + 2), doc("o-1", "processing", T0 + 1),
                                doc("o-1", "shipped", T0 + 2), doc("o-2", "pending", T0)), "s")
    assert [r.outcome for r in results] == [Outcome.DONE, Outcome.STALE, Outcome.DUPLICATE, Outcome.DONE]
    assert view.state == {"o-1": "shipped", "o-2": "pending"}
    assert view.calls == [[("o-1", "shipped"), ("o-2", "pending")]]
    assert marks.get_many([mark_key("view", change("o-1", "shipped", T0 + 2))]) == {
        mark_key("view", change("o-1", "shipped", T0 + 2)): v("o-1", "shipped", T0 + 2)}


def test_marks_carry_across_batches_and_workers():
    marks = InMemoryHighWaterMarkStore()
    ordered(View(), marks).process(records(doc("o-1", "delivered", T0 + 9)), "s")
    view = View()
    late = ordered(view, marks)  # another worker, after a restart or a lease move
    results = late.process(records(doc("o-1", "shipped", T0 + 5), doc("o-1", "delivered", T0 + 9), start=5), "s")
    assert [r.outcome for r in results] == [Outcome.STALE, Outcome.DUPLICATE]
    assert view.calls == []
    assert results[0].routes == (("view", Outcome.STALE),)


def test_an_ordered_route_gets_one_change_per_item_per_call_oldest_first():
    view = View()
    ordered(view).process(records(doc("o-1", "processing", T0 + 1), doc("o-2", "pending", T0),
                                  doc("o-1", "shipped", T0 + 2), doc("o-1", "delivered", T0 + 3)), "s")
    assert view.calls == [[("o-1", "processing"), ("o-2", "pending")], [("o-1", "shipped")], [("o-1", "delivered")]]
    assert view.state == {"o-1": "delivered", "o-2": "pending"}


def test_marks_are_written_once_per_item_per_batch():
    marks = InMemoryHighWaterMarkStore()
    ordered(View(), marks).process(records(*[doc("o-1", f"s{i}", T0 + i) for i in range(5)]), "s")
    assert marks.calls == {"get_many": 1, "advance": 1}


def test_a_failing_change_holds_later_changes_of_its_order_only():
    view = View(fail={("o-1", "shipped"): [RetryableError("throttled")]})
    p = ordered(view)
    results = p.process(records(doc("o-1", "shipped", T0 + 1), doc("o-2", "shipped", T0 + 1),
                                doc("o-1", "delivered", T0 + 2), doc("o-2", "delivered", T0 + 2)), "s")
    assert {r.outcome for r in results} == {Outcome.DONE}
    assert view.calls == [
        [("o-1", "shipped"), ("o-2", "shipped")],
        [("o-1", "shipped"), ("o-2", "delivered")],  # o-2 goes on; o-1 retries before its next change
        [("o-1", "delivered")],
    ]


def test_after_a_change_is_dead_lettered_the_later_ones_of_its_order_go_on():
    dlq = InMemoryDeadLetterSink()
    view = View(fail={("o-1", "shipped"): [PermanentError("bad")]})
    results = ordered(view, dlq=dlq).process(records(doc("o-1", "shipped", T0 + 1), doc("o-1", "delivered", T0 + 2)), "s")
    assert [r.outcome for r in results] == [Outcome.DEAD_LETTERED, Outcome.DONE]
    assert dlq.letters[0].failed_routes == ("view",)


def test_unordered_routes_hold_only_after_a_failure():
    """Round one sends everything (a batch aggregate wants one call); after a failure,
    the failed change is retried before any later, still-unsettled change of its order."""
    view = View(fail={("o-1", "shipped"): [RetryableError("x")], ("o-1", "delivered"): [RetryableError("y")]})
    clock = FakeClock()
    p = Pipeline(router=Router([Route("agg", "Orders", view, idempotency=Idempotency.OFF)]), ctx=None,
                 dead_letters=InMemoryDeadLetterSink(), retry=RetryPolicy(max_attempts=3, base_seconds=0, max_seconds=0),
                 sleep=clock.sleep, clock=clock, runner=run_inline)
    p.process(records(doc("o-1", "shipped", T0 + 1), doc("o-1", "delivered", T0 + 2), doc("o-2", "x", T0)), "s")
    assert view.calls == [[("o-1", "shipped"), ("o-1", "delivered"), ("o-2", "x")],
                          [("o-1", "shipped")], [("o-1", "delivered")]]


def test_ordered_marks_on_dynamodb_cost_one_read_per_100_items_and_one_write_per_item(moto_server):
    client = ddb_client(moto_server)
    name = idempotency_table(client)
    calls = counting(client)
    marks = DynamoDbHighWaterMarkStore(client, name)
    p = ordered(View(), marks)
    p.process(records(*[doc(f"o-{i}", "shipped", T0) for i in range(150)]), "s")
    assert dict(calls) == {"BatchGetItem": 2, "UpdateItem": 150}
    calls.clear()
    results = p.process(records(*[doc(f"o-{i}", "processing", T0 - 1) for i in range(150)], start=500), "s")
    assert {r.outcome for r in results} == {Outcome.STALE}
    assert dict(calls) == {"BatchGetItem": 2}


def test_stale_and_duplicate_records_are_settled_for_the_checkpoint():
    from orders_cdc.checkpointing import CheckpointPolicy

    marks = InMemoryHighWaterMarkStore()
    p = ordered(View(), marks)
    p.process(records(doc("o-1", "delivered", T0 + 9)), "s")
    results = p.process(records(doc("o-1", "shipped", T0 + 5), doc("o-1", "delivered", T0 + 9), start=5), "s")
    policy = CheckpointPolicy(every_records=1, clock=lambda: 0.0, sleep=lambda s: None)
    policy.observe(results)
    assert policy.due() and policy._pending == (sequence_number(6), 0)
