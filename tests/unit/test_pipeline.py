"""Batch -> outcomes, with handlers that fail in scripted ways and an in-memory DLQ."""

import pytest

from orders_cdc.concurrency import InlinePool
from orders_cdc.deadletter import DeadLetterSink, InMemoryDeadLetterSink
from orders_cdc.errors import FatalProcessingError, PartialBatchFailure, PermanentError, RetryableError
from orders_cdc.pipeline import Outcome, Pipeline
from orders_cdc.retry import RetryPolicy
from orders_cdc.routing import Route, Router
from tests.factories import kcl_record, kds_record, sequence_number


def order(order_id, status, old_status=None, event="MODIFY"):
    new = {"order_id": order_id, "status": status}
    old = {"order_id": order_id, "status": old_status} if old_status else None
    if event == "INSERT":
        old = None
    return kds_record(event, new=new, old=old, keys={"order_id": order_id})


def batch(*docs):
    return [kcl_record(doc, sequence_number(i)) for i, doc in enumerate(docs, 1)]


class Calls:
    def __init__(self):
        self.seen = []

    def ok(self, changes, ctx):
        self.seen.append([c.keys["order_id"] for c in changes])


class FailingDeadLetters(DeadLetterSink):
    def send(self, letters):
        raise RetryableError("SQS down")


class FakeClock:
    """Epoch seconds that move only when the pipeline sleeps."""

    def __init__(self, now=1_900_000_000.0):
        self.now = now
        self.slept = []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.slept.append(seconds)
        self.now += seconds


def pipeline(routes, dlq=None, attempts=3, clock=None, **kw):
    clock = clock or FakeClock()
    return Pipeline(
        router=Router(routes),
        ctx=None,
        dead_letters=dlq if dlq is not None else InMemoryDeadLetterSink(),
        retry=RetryPolicy(max_attempts=attempts, base_seconds=0.0, max_seconds=0.0),
        sleep=clock.sleep,
        clock=clock,
        pool=InlinePool(),
        **kw,
    )


def test_each_record_gets_one_outcome_in_order():
    calls = Calls()
    p = pipeline([Route("all", "Orders", calls.ok)])
    other_table = kds_record("INSERT", new={"id": "x"}, keys={"id": "x"}, table="Other")
    results = p.process(batch(order("o-1", "shipped", "processing"), other_table, order("o-2", "pending", event="INSERT")), "shard-0")
    assert [r.outcome for r in results] == [Outcome.DONE, Outcome.SKIPPED, Outcome.DONE]
    assert [r.sequence_number for r in results] == [sequence_number(1), sequence_number(2), sequence_number(3)]
    assert calls.seen == [["o-1", "o-2"]]


def test_decode_error_is_dead_lettered_with_reason_and_the_rest_goes_on():
    calls = Calls()
    dlq = InMemoryDeadLetterSink()
    p = pipeline([Route("all", "Orders", calls.ok)], dlq)
    records = batch(order("o-1", "pending", event="INSERT"), order("o-2", "pending", event="INSERT"))
    records[0] = {**records[0], "data": "%%% not base64"}
    results = p.process(records, "shard-0")
    assert [r.outcome for r in results] == [Outcome.DEAD_LETTERED, Outcome.DONE]
    assert calls.seen == [["o-2"]]
    [letter] = dlq.letters
    assert letter.record == records[0], "the original record, untouched"
    assert "base64" in letter.reason
    assert (letter.shard_id, letter.sequence_number, letter.attempts) == ("shard-0", sequence_number(1), 1)


def nested(depth):
    value = {"S": "leaf"}
    for _ in range(depth):
        value = {"M": {"a": value}}
    return value


def test_a_record_that_cannot_be_keyed_or_routed_is_dead_lettered_alone_and_the_rest_goes_on():
    """Nested 300 levels, an image decodes (Python has no such limit) but orjson cannot
    serialise it for the idempotency digest (255 levels): that used to end the child on every
    restart. A predicate that raises on one record is the same: that record alone."""
    from orders_cdc.idempotency.memory import InMemoryIdempotencyStore

    calls = Calls()
    dlq = InMemoryDeadLetterSink()

    def picky(change):
        if change.keys["order_id"] == "o-3":
            raise KeyError("total")
        return True

    p = pipeline([Route("all", "Orders", calls.ok, when=picky)], dlq, idempotency=InMemoryIdempotencyStore())
    import base64
    import json

    deep = kds_record("INSERT", new={"order_id": "o-1", "status": "pending"}, keys={"order_id": "o-1"})
    deep["dynamodb"]["NewImage"]["notes"] = nested(200)  # 400 JSON levels
    records = batch(order("o-0", "pending", event="INSERT"), order("o-2", "pending", event="INSERT"),
                    order("o-3", "pending", event="INSERT"))
    records[0] = {**records[0], "data": base64.b64encode(json.dumps(deep).encode()).decode()}  # orjson: 255 levels
    results = p.process(records, "shard-0")
    assert [r.outcome for r in results] == [Outcome.DEAD_LETTERED, Outcome.DONE, Outcome.DEAD_LETTERED]
    assert calls.seen == [["o-2"]]
    first, third = dlq.letters
    assert first.record == records[0] and "cannot be planned" in first.reason and first.attempts == 1
    assert third.record == records[2] and "KeyError" in third.reason


def test_retryable_failure_is_retried_until_it_succeeds():
    attempts = []

    def flaky(changes, ctx):
        attempts.append(len(changes))
        if len(attempts) < 3:
            raise RetryableError("throttled")

    p = pipeline([Route("flaky", "Orders", flaky)], attempts=5)
    results = p.process(batch(order("o-1", "pending", event="INSERT")), "s")
    assert [r.outcome for r in results] == [Outcome.DONE]
    assert attempts == [1, 1, 1]


def test_only_the_failed_route_and_records_are_retried():
    calls = Calls()
    tries = []

    def partial(changes, ctx):
        tries.append([c.keys["order_id"] for c in changes])
        if len(tries) == 1:
            raise PartialBatchFailure({1: RetryableError("one failed")})

    p = pipeline([Route("ok", "Orders", calls.ok), Route("partial", "Orders", partial)])
    results = p.process(batch(order("o-1", "pending", event="INSERT"), order("o-2", "pending", event="INSERT")), "s")
    assert [r.outcome for r in results] == [Outcome.DONE, Outcome.DONE]
    assert tries == [["o-1", "o-2"], ["o-2"]]
    assert calls.seen == [["o-1", "o-2"]], "the route that succeeded is not run again"


def test_permanent_error_is_dead_lettered_at_once():
    tries = []

    def bad(changes, ctx):
        tries.append(1)
        raise PermanentError("validation failed")

    dlq = InMemoryDeadLetterSink()
    p = pipeline([Route("bad", "Orders", bad)], dlq, attempts=5)
    results = p.process(batch(order("o-1", "pending", event="INSERT")), "s")
    assert [r.outcome for r in results] == [Outcome.DEAD_LETTERED]
    assert tries == [1]
    assert dlq.letters[0].failed_routes == ("bad",)
    assert dlq.letters[0].error_type == "PermanentError"


def test_retries_are_bounded_then_dead_lettered():
    """Changed with the circuit breaker: a record is dead-lettered for a retryable error
    once the route has shown it works without it (here: o-2 succeeds)."""
    tries = []

    def bad_o1(changes, ctx):
        tries.append([c.keys["order_id"] for c in changes])
        failures = {j: RetryableError("still failing") for j, c in enumerate(changes) if c.keys["order_id"] == "o-1"}
        if failures:
            raise PartialBatchFailure(failures)

    dlq = InMemoryDeadLetterSink()
    records = batch(order("o-1", "x", event="INSERT"), order("o-2", "x", event="INSERT"))
    results = pipeline([Route("down", "Orders", bad_o1)], dlq, attempts=3).process(records, "s")
    assert [r.outcome for r in results] == [Outcome.DEAD_LETTERED, Outcome.DONE]
    assert tries == [["o-1", "o-2"], ["o-1"], ["o-1"]]
    assert dlq.letters[0].attempts == 3


def test_unknown_errors_are_bounded_even_on_a_route_that_never_worked():
    tries = []

    def buggy(changes, ctx):
        tries.append(1)
        raise KeyError("total")  # a bug this record triggers, not an outage

    dlq = InMemoryDeadLetterSink()
    results = pipeline([Route("buggy", "Orders", buggy)], dlq, attempts=3).process(batch(order("o-1", "x", event="INSERT")), "s")
    assert [r.outcome for r in results] == [Outcome.DEAD_LETTERED]
    assert len(tries) == 3 and dlq.letters[0].attempts == 3 and dlq.letters[0].error_type == "KeyError"


def test_records_older_than_max_age_are_not_retried():
    tries = []

    def down(changes, ctx):
        tries.append(1)
        raise RetryableError("down")

    p = Pipeline(router=Router([Route("down", "Orders", down)]), ctx=None, dead_letters=InMemoryDeadLetterSink(),
                 retry=RetryPolicy(max_attempts=10, base_seconds=0, max_seconds=0, max_record_age_seconds=60),
                 sleep=lambda s: None, pool=InlinePool())  # the factory's records were created in 2024
    results = p.process(batch(order("o-1", "x", event="INSERT")), "s")
    assert [r.outcome for r in results] == [Outcome.DEAD_LETTERED]
    assert tries == [1]


def test_unwritable_dead_letter_queue_is_fatal_not_acknowledged():
    p = pipeline([], FailingDeadLetters())
    records = batch(order("o-1", "x", event="INSERT"))
    records[0] = {**records[0], "data": "!!"}
    with pytest.raises(FatalProcessingError, match="could not be dead-lettered"):
        p.process(records, "s")


def test_corrupt_image_found_while_routing_is_dead_lettered():
    calls = Calls()
    dlq = InMemoryDeadLetterSink()
    from orders_cdc.routing import transition

    p = pipeline([Route("shipped", "Orders", calls.ok, when=transition("status", "shipped"))], dlq)
    bad = kds_record("MODIFY", new_av={"order_id": {"S": "o-1"}, "status": {"XX": "shipped"}},
                     old={"order_id": "o-1", "status": "processing"}, keys={"order_id": "o-1"})
    results = p.process(batch(bad, order("o-2", "shipped", "processing")), "s")
    assert [r.outcome for r in results] == [Outcome.DEAD_LETTERED, Outcome.DONE]
    assert calls.seen == [["o-2"]]
    assert "XX" in dlq.letters[0].reason


def test_corrupt_attribute_no_predicate_reads_is_dead_lettered_before_any_route_runs():
    # Routing reads only "status"; the handlers would read "total". The record goes to the
    # dead-letter queue once, with the attribute's path, and no route acts on half of it.
    first, second = Calls(), Calls()
    dlq = InMemoryDeadLetterSink()
    p = pipeline([Route("first", "Orders", first.ok), Route("second", "Orders", second.ok)], dlq)
    bad = kds_record("INSERT", new_av={"order_id": {"S": "o-1"}, "status": {"S": "pending"}, "total": {"N": "1E+200"}},
                     keys={"order_id": "o-1"})
    results = p.process(batch(bad, order("o-2", "pending", event="INSERT")), "s")
    assert [r.outcome for r in results] == [Outcome.DEAD_LETTERED, Outcome.DONE]
    assert first.seen == second.seen == [["o-2"]]
    assert len(dlq.letters) == 1
    assert dlq.letters[0].reason.startswith("NewImage.total: N value '1E+200' is outside DynamoDB's range")
    assert dlq.letters[0].attempts == 1


def test_change_that_matches_nothing_is_skipped_without_decoding_its_images():
    calls = Calls()
    dlq = InMemoryDeadLetterSink()
    p = pipeline([Route("other", "Other", calls.ok)], dlq)
    unread = kds_record("INSERT", new_av={"order_id": {"S": "o-1"}, "junk": {"BOGUS": "1"}}, keys={"order_id": "o-1"})
    results = p.process(batch(unread), "s")
    assert [r.outcome for r in results] == [Outcome.SKIPPED]
    assert dlq.letters == [] and calls.seen == []
    change = results[0].change
    assert change._new_image is None  # never decoded: routing read nothing from it
