"""The idempotency store's lifecycle, the same for the in-memory and the DynamoDB backend
(a real moto server), plus the change keys and the DynamoDB error mapping."""

from __future__ import annotations

import uuid
from collections import Counter
from decimal import Decimal

import boto3
import orjson
import pytest
from botocore.exceptions import ClientError

from orders_cdc.change import decode_kinesis_data
from orders_cdc.counters import CounterUpdate
from orders_cdc.errors import FatalProcessingError, RetryableError, is_retryable
from orders_cdc.idempotency import (
    IdempotencyAlreadyCompletedError,
    IdempotencyInProgressError,
    IdempotencyStoreConfigError,
    IdempotencyStoreUnavailableError,
    reaction_key,
)
from orders_cdc.idempotency.dynamodb import DynamoDbIdempotencyStore
from orders_cdc.idempotency.memory import InMemoryIdempotencyStore
from tests.factories import kds_record

NOW = 1_900_000_000.0


def ddb_client(url):
    return boto3.client("dynamodb", endpoint_url=url, region_name="us-east-1",
                        aws_access_key_id="test", aws_secret_access_key="test")


def counting(client) -> Counter:
    calls: Counter = Counter()
    client.meta.events.register("before-call.dynamodb.*", lambda model, **_: calls.update([model.name]))
    return calls


def idempotency_table(client) -> str:
    """A fresh table shaped like the idempotency table (key `id` S), on the shared moto server."""
    name = f"Idempotency-{uuid.uuid4().hex[:8]}"
    client.create_table(TableName=name, KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
                        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}], BillingMode="PAY_PER_REQUEST")
    return name


@pytest.fixture
def table(moto_server):
    client = ddb_client(moto_server)
    return client, idempotency_table(client)


@pytest.fixture(params=["memory", "dynamodb"])
def make_store(request):
    """make_store(owner=...) -> a store; stores made by one test share their records."""
    if request.param == "memory":
        shared = InMemoryIdempotencyStore(lock_seconds=30, ttl_seconds=3600)

        def make(owner="me"):
            store = InMemoryIdempotencyStore(lock_seconds=30, ttl_seconds=3600, owner=owner)
            store.records, store.counters = shared.records, shared.counters
            return store

        return make
    client, name = request.getfixturevalue("table")
    return lambda owner="me": DynamoDbIdempotencyStore(client, name, sleep=lambda s: None, lock_seconds=30,
                                                       ttl_seconds=3600, owner=owner)


def test_lock_then_success_then_duplicate(make_store):
    store = make_store()
    store.save_inprogress("r#1", NOW)
    assert store.completed(["r#1"], NOW) == set(), "a lock is not a completed reaction"
    store.save_success(["r#1"], NOW + 1)
    assert store.completed(["r#1", "r#2"], NOW + 2) == {"r#1"}
    with pytest.raises(IdempotencyAlreadyCompletedError):
        store.save_inprogress("r#1", NOW + 3)
    with pytest.raises(IdempotencyAlreadyCompletedError):
        make_store("other").save_inprogress("r#1", NOW + 3)


def test_a_lock_held_by_another_worker_defers_until_its_lease_ends(make_store):
    crashed, me = make_store("crashed"), make_store("me")
    crashed.save_inprogress("r#1", NOW)
    with pytest.raises(IdempotencyInProgressError) as held:
        me.save_inprogress("r#1", NOW + 10)
    assert held.value.until == pytest.approx(NOW + 30)
    assert isinstance(held.value, RetryableError)
    me.save_inprogress("r#1", NOW + 31)  # the crashed worker's lease ran out


def test_the_owner_may_retake_its_own_lock(make_store):
    store = make_store()
    store.save_inprogress("r#1", NOW)
    store.save_inprogress("r#1", NOW + 1)


def test_expired_records_count_as_absent(make_store):
    """DynamoDB's TTL deletes lazily: a record past expires_at must not count."""
    store = make_store()
    store.save_success(["r#1"], NOW)
    later = NOW + 3600 + 1
    assert store.completed(["r#1"], later) == set()
    store.save_inprogress("r#1", later)


def test_delete_releases_locks(make_store):
    store, other = make_store(), make_store("other")
    store.save_inprogress("r#1", NOW)
    store.delete(["r#1"])
    other.save_inprogress("r#1", NOW + 1)


def test_dynamodb_batches_reads_and_writes(table):
    client, name = table
    calls = counting(client)
    store = DynamoDbIdempotencyStore(client, name, ttl_seconds=3600)
    keys = [f"metrics#{i}" for i in range(250)]
    store.save_success(keys[:60], NOW)
    assert calls["BatchWriteItem"] == 3, "25 markers per call"
    assert store.completed(keys, NOW) == set(keys[:60])
    assert calls["BatchGetItem"] == 3, "100 keys per call"
    item = client.get_item(TableName=name, Key={"id": {"S": "metrics#0"}})["Item"]
    assert item["status"] == {"S": "COMPLETED"} and int(item["expires_at"]["N"]) == int(NOW) + 3600


def test_dynamodb_lock_failure_reports_the_holder_in_one_call(table):
    client, name = table
    DynamoDbIdempotencyStore(client, name, owner="a", lock_seconds=30).save_inprogress("r#1", NOW)
    calls = counting(client)
    with pytest.raises(IdempotencyInProgressError):
        DynamoDbIdempotencyStore(client, name, owner="b", lock_seconds=30).save_inprogress("r#1", NOW + 1)
    assert sum(calls.values()) == calls["PutItem"] == 1, "ReturnValuesOnConditionCheckFailure saves the read"


def test_dynamodb_missing_table_is_fatal(moto_server):
    store = DynamoDbIdempotencyStore(ddb_client(moto_server), f"missing-{uuid.uuid4().hex[:8]}")
    with pytest.raises(IdempotencyStoreConfigError) as info:
        store.save_inprogress("r#1", NOW)
    assert isinstance(info.value, FatalProcessingError), "never dead-letter every record for a missing table"


class StubDynamoDb:
    """Scripted replies, or ClientErrors, per operation."""

    def __init__(self, **script):
        self.script = {op: list(replies) for op, replies in script.items()}
        self.calls = Counter()

    def __getattr__(self, op):
        def call(**kwargs):
            self.calls[op] += 1
            reply = self.script[op].pop(0)
            if isinstance(reply, Exception):
                raise reply
            return reply

        return call


def client_error(code, status=400):
    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")


def test_throttling_maps_to_a_retryable_store_error():
    store = DynamoDbIdempotencyStore(StubDynamoDb(put_item=[client_error("ProvisionedThroughputExceededException")]), "t")
    with pytest.raises(IdempotencyStoreUnavailableError):
        store.save_inprogress("r#1", NOW)


def test_unprocessed_keys_are_retried_then_reported():
    item = {"id": {"S": "k1"}, "status": {"S": "COMPLETED"}, "expires_at": {"N": str(int(NOW) + 60)}}
    unprocessed = {"t": {"Keys": [{"id": {"S": "k2"}}]}}
    ok = StubDynamoDb(batch_get_item=[{"Responses": {"t": [item]}, "UnprocessedKeys": unprocessed},
                                      {"Responses": {"t": []}, "UnprocessedKeys": {}}])
    assert DynamoDbIdempotencyStore(ok, "t", sleep=lambda s: None).completed(["k1", "k2"], NOW) == {"k1"}
    assert ok.calls["batch_get_item"] == 2
    stuck = StubDynamoDb(batch_get_item=[{"Responses": {}, "UnprocessedKeys": unprocessed}] * 5)
    with pytest.raises(IdempotencyStoreUnavailableError):
        DynamoDbIdempotencyStore(stuck, "t", sleep=lambda s: None).completed(["k2"], NOW)


# ---------------------------------------------------------------------------------------------
# Keys


def change(**kw):
    args = {"event": "MODIFY", "new": {"order_id": "o-1", "status": "shipped"},
            "old": {"order_id": "o-1", "status": "processing"}, "keys": {"order_id": "o-1"}, **kw}
    return decode_kinesis_data(orjson.dumps(kds_record(**args)))


def test_reaction_key_survives_redelivery_with_a_new_event_id():
    assert reaction_key("r", change(event_id="a")) == reaction_key("r", change(event_id="b"))


@pytest.mark.parametrize("other", [
    {"created_us": 1721011165891551},
    {"new": {"order_id": "o-1", "status": "delivered"}},
    {"table": "Orders2"},
    {"keys": {"order_id": "o-2"}, "new": {"order_id": "o-2", "status": "shipped"},
     "old": {"order_id": "o-2", "status": "processing"}},
])
def test_reaction_key_tells_different_changes_apart(other):
    assert reaction_key("r", change()) != reaction_key("r", change(**other))


def test_streams_format_keys_add_the_event_id():
    from orders_cdc.change import decode_streams_record
    from tests.factories import streams_record

    def keys_only(sequence):  # two changes in one second, no images: only the eventID differs
        return decode_streams_record(streams_record("MODIFY", view="KEYS_ONLY", keys={"order_id": "o-1"}, sequence=sequence))

    assert reaction_key("r", keys_only("1001")) != reaction_key("r", keys_only("1002"))
    assert reaction_key("r", keys_only("1001")) == reaction_key("r", keys_only("1001"))


def test_reaction_key_is_per_route():
    assert reaction_key("email", change()) != reaction_key("refund", change())
    assert reaction_key("email", change()).startswith("email#")


# ---------------------------------------------------------------------------------------------
# ATOMIC commits: counter updates and their done-markers in one transaction


def add(key: str, n: int, table: str, counter: str = "counter#1") -> list[CounterUpdate]:
    return [CounterUpdate.of(table, {"id": counter}, {"n": Decimal(n)})]


def counter_of(store, table: str, counter: str = "counter#1") -> int:
    if isinstance(store, InMemoryIdempotencyStore):
        return int(store.counters.get((table, (("id", counter),)), {}).get("n", 0))
    item = store._ddb.get_item(TableName=table, Key={"id": {"S": counter}}, ConsistentRead=True).get("Item", {})
    return int(item.get("n", {}).get("N", 0))


def counter_table(store) -> str:
    # The counters live in the idempotency table itself here (its key is `id` too).
    return getattr(store, "table", "Counters")


def test_commit_applies_each_entry_once_with_its_marker(make_store):
    store, other = make_store(), make_store("other")
    t = counter_table(store)
    first = store.commit([("m#1", add("m#1", 1, t)), ("m#2", add("m#2", 2, t))], NOW)
    assert (first.done, first.duplicate, first.failed) == ([0, 1], [], {})
    assert store.completed(["m#1", "m#2"], NOW) == {"m#1", "m#2"}
    # Another worker (or a restarted child) commits a group that overlaps: the marker in the
    # way drops m#2 from the transaction and the rest is committed.
    second = other.commit([("m#2", add("m#2", 2, t)), ("m#3", add("m#3", 4, t))], NOW + 1)
    assert (second.done, second.duplicate, second.failed) == ([1], [0], {})
    assert counter_of(store, t) == 1 + 2 + 4


def test_an_expired_marker_does_not_block_a_commit(make_store):
    store = make_store()
    t = counter_table(store)
    store.commit([("m#1", add("m#1", 1, t))], NOW)
    assert store.commit([("m#1", add("m#1", 1, t))], NOW + 3600 + 1).done == [0], "past the TTL: a new change"
    assert counter_of(store, t) == 2


def test_a_change_too_big_for_one_transaction_is_committed_in_parts_exactly_once(make_store):
    """An order of 250 products: 250 counters cannot share one transaction with a marker.
    It used to be dead-lettered for good; now it goes in parts, each with its own marker."""
    store = make_store()
    t = counter_table(store)
    huge = [u for i in range(250) for u in add("m#1", 1, t, counter=f"counter#{i}")]
    result = store.commit([("m#1", huge), ("m#2", add("m#2", 5, t, counter="other")), ("m#3", [])], NOW)
    assert (sorted(result.done), result.duplicate, result.failed) == ([0, 1, 2], [], {})
    assert [counter_of(store, t, f"counter#{i}") for i in (0, 97, 98, 249)] == [1, 1, 1, 1]
    assert counter_of(store, t, "other") == 5
    assert store.completed(["m#1", "m#1#part0", "m#1#part2", "m#2", "m#3"], NOW) == {
        "m#1", "m#1#part0", "m#1#part2", "m#2"}
    again = store.commit([("m#1", huge)], NOW + 1)
    assert again.duplicate == [0] and counter_of(store, t, "counter#249") == 1, "a redelivery counts nothing twice"


def test_a_change_committed_in_parts_resumes_after_a_failure_between_parts():
    class FailsOnce(InMemoryIdempotencyStore):
        failed = False

        def _transact(self, markers, updates, now):
            if any(m.key.endswith("#part1") for m in markers) and not self.failed:
                self.failed = True
                raise RetryableError("throttled")
            return super()._transact(markers, updates, now)

    store = FailsOnce(ttl_seconds=3600)
    huge = [u for i in range(150) for u in add("m#1", 1, "Counters", counter=f"counter#{i}")]
    first = store.commit([("m#1", huge)], NOW)
    assert list(first.failed) == [0] and is_retryable(first.failed[0])
    assert sum(counter_of(store, "Counters", f"counter#{i}") for i in range(150)) == 98, "the first part only"
    second = store.commit([("m#1", huge)], NOW + 1)
    assert second.done == [0]
    assert {counter_of(store, "Counters", f"counter#{i}") for i in range(150)} == {1}, "each counter once"


def test_dynamodb_commits_are_grouped_100_items_a_transaction(table):
    client, name = table
    store = DynamoDbIdempotencyStore(client, name, ttl_seconds=3600)
    calls = counting(client)
    # 150 changes over 10 counters: 90 markers + 10 counters, then 60 + 10.
    entries = [(f"m#{i}", add(f"m#{i}", 1, name, counter=f"counter#{i % 10}")) for i in range(150)]
    result = store.commit(entries, NOW)
    assert sorted(result.done) == list(range(150)) and dict(calls) == {"TransactWriteItems": 2}
    assert sum(counter_of(store, name, f"counter#{i}") for i in range(10)) == 150


def test_a_commit_to_a_missing_table_is_fatal(table):
    client, name = table
    store = DynamoDbIdempotencyStore(client, name, ttl_seconds=3600)
    result = store.commit([("m#1", add("m#1", 1, f"missing-{uuid.uuid4().hex[:8]}"))], NOW)
    assert isinstance(result.failed[0], FatalProcessingError), "never dead-letter every record for a missing table"


def test_one_bad_change_in_a_shared_transaction_fails_alone_and_its_neighbours_are_counted(table):
    """A key DynamoDB refuses (2,100 bytes; the limit is 2,048) cancels the whole group's
    transaction: the group is retried member by member, so only that change fails."""
    client, name = table
    store = DynamoDbIdempotencyStore(client, name, ttl_seconds=3600)
    bad = [CounterUpdate.of(name, {"id": "p" * 2100}, {"n": Decimal(1)})]
    result = store.commit([("m#1", add("m#1", 1, name)), ("m#2", bad), ("m#3", add("m#3", 1, name))], NOW)
    assert sorted(result.done) == [0, 2] and list(result.failed) == [1]
    assert not is_retryable(result.failed[1]), "dead-lettered, as a bad record"
    assert store.completed(["m#1", "m#2", "m#3"], NOW) == {"m#1", "m#3"}


def test_a_late_release_never_deletes_another_workers_lock_or_a_done_marker(make_store):
    """Our lease ran out and another worker took the lock: our release must leave it."""
    mine, theirs = make_store("me"), make_store("other")
    mine.save_inprogress("k-1", NOW)
    theirs.save_inprogress("k-1", NOW + 31)  # after our 30 s lease
    mine.save_inprogress("k-2", NOW)
    mine.save_success(["k-3"], NOW)
    mine.delete(["k-1", "k-2", "k-3"])
    with pytest.raises(IdempotencyInProgressError):
        make_store("third").save_inprogress("k-1", NOW + 32)
    make_store("third").save_inprogress("k-2", NOW + 1)  # ours, released: free at once
    assert mine.completed(["k-3"], NOW) == {"k-3"}
