"""replication.orders_replica: the version conditions against a real moto server, the
batching with an in-memory client, and the issue's "done when" at the pipeline level: a
scripted history written to a real (moto) Orders table, its own stream's changes delivered
duplicated, reordered and redelivered through the production pipeline, and then the replica
equals the table item for item."""

from __future__ import annotations

import random
from decimal import Decimal
from itertools import count
from typing import Any

import boto3
import orjson
import pytest
from boto3.dynamodb.types import TypeDeserializer, TypeSerializer

from orders_cdc.app import Clients, Context, build_pipeline
from orders_cdc.change import ChangeRecord, Position, decode_kinesis_data
from orders_cdc.deadletter import InMemoryDeadLetterSink
from orders_cdc.errors import PartialBatchFailure
from orders_cdc.local.bridge import attribute_value_json
from orders_cdc.local.orders import new_order
from orders_cdc.local.summary import Summary, one_line
from orders_cdc.outcomes import Outcome
from orders_cdc.pipeline import Pipeline
from orders_cdc.retry import RetryPolicy
from orders_cdc.routing import Router
from orders_cdc.settings import Resources, Settings, load
from processors import _conditional, all_routes, replication
from processors._order import OrderDataError
from tests.factories import TTL_IDENTITY, kcl_record, kds_record, sequence_number

ROUTE = "replication.orders_replica"
_ser, _de = TypeSerializer(), TypeDeserializer()
_seq = count(1)


def position(n: int | None = None) -> Position:
    return Position("shardId-000000000000", sequence_number(next(_seq) if n is None else n))


def change(event: str, item: dict | None, old: dict | None, us: int, *, seq: int | None = None,
           ttl: bool = False, table: str = "Orders") -> ChangeRecord:
    oid = (item or old)["order_id"]
    doc = kds_record(event, new=item, old=old, keys={"order_id": oid}, created_us=us, ttl=ttl, table=table)
    return decode_kinesis_data(orjson.dumps(doc), position(seq))


def order(oid: str, status: str = "pending", **extra: Any) -> dict:
    return {"order_id": oid, "status": status, "total": Decimal("12.30"), "items": [
        {"product_id": "p-1", "quantity": Decimal(1), "unit_price": Decimal("12.30")}], **extra}


def scan(ddb, table: str) -> dict[str, dict]:
    items, kwargs = {}, {"TableName": table, "ConsistentRead": True}
    while True:
        page = ddb.scan(**kwargs)
        for raw in page["Items"]:
            item = {k: _de.deserialize(v) for k, v in raw.items()}
            items[item["order_id"]] = item
        if "LastEvaluatedKey" not in page:
            return items
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def live_copies(ddb, table: str) -> dict[str, dict]:
    """The replica as a reader sees it: tombstones skipped, the version attributes left out."""
    return {oid: {k: v for k, v in item.items() if k not in replication.RESERVED}
            for oid, item in scan(ddb, table).items() if replication.DELETED not in item}


# ---------------------------------------------------------------------------------------------
# On a real moto server: the conditions


@pytest.fixture
def replica(moto_resources):
    names, aws, created, env = moto_resources
    settings = load(env)
    session = boto3.session.Session(aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1")
    ctx = Context(settings, Clients(settings, session))
    calls: list[tuple[str, int]] = []
    ctx.clients.replica.meta.events.register(
        "before-parameter-build.dynamodb", lambda model, params, **_: calls.append((model.name, len(params.get("TransactItems", [1])))))
    return names, aws, created, ctx, calls


def test_the_newest_version_wins_and_a_stale_change_is_not_an_error(replica):
    names, aws, _, ctx, _ = replica
    write = lambda *cs: replication.orders_replica(list(cs), ctx)  # noqa: E731
    v1, v2, v3 = order("o-1"), order("o-1", "processing"), order("o-1", "shipped", tracking_number="1Z1")
    write(change("MODIFY", v3, v2, 3_000))
    write(change("MODIFY", v3, v2, 3_000))  # a duplicate (a new Kinesis record, the same change)
    write(change("MODIFY", v2, v1, 2_000))  # overtaken: arrives after the newer one
    write(change("INSERT", v1, None, 1_000))  # and the first change last of all
    stored = scan(aws.dynamodb, names.replica_table)["o-1"]
    assert {k: v for k, v in stored.items() if k not in replication.RESERVED} == v3
    assert stored[replication.VERSION_US] == 3_000


def test_a_remove_leaves_a_tombstone_that_older_changes_cannot_bring_back_and_a_newer_insert_can(replica):
    names, aws, _, ctx, _ = replica
    write = lambda *cs: replication.orders_replica(list(cs), ctx)  # noqa: E731
    v1, v2 = order("o-2"), order("o-2", "processing")
    write(change("INSERT", v1, None, 5_000_000))
    write(change("REMOVE", None, v2, 7_000_000))
    write(change("MODIFY", v2, v1, 6_000_000))  # reordered: older than the REMOVE
    write(change("INSERT", v1, None, 5_000_000))  # a duplicate of the first change, late
    tomb = scan(aws.dynamodb, names.replica_table)["o-2"]
    assert tomb == {"order_id": "o-2", replication.DELETED: True, replication.VERSION_US: 7_000_000,
                    replication.VERSION_SEQ: tomb[replication.VERSION_SEQ],
                    replication.EXPIRES_AT: 7 + ctx.settings.idempotency_ttl_seconds}
    assert live_copies(aws.dynamodb, names.replica_table) == {}
    again = order("o-2", "pending", note="re-created")
    write(change("INSERT", again, None, 8_000_000))
    assert live_copies(aws.dynamodb, names.replica_table) == {"o-2": again}
    assert replication.DELETED not in scan(aws.dynamodb, names.replica_table)["o-2"]


def test_same_microsecond_changes_are_ordered_by_sequence_number_and_a_foreign_item_is_overwritten(replica):
    names, aws, _, ctx, _ = replica
    write = lambda *cs: replication.orders_replica(list(cs), ctx)  # noqa: E731
    a, b = order("o-3", "processing"), order("o-3", "shipped")
    write(change("MODIFY", b, a, 9_000, seq=20))
    write(change("MODIFY", a, None, 9_000, seq=10))  # the same microsecond, earlier in the stream
    assert live_copies(aws.dynamodb, names.replica_table)["o-3"] == b
    # An item the replica did not write (no version) does not block the copy forever.
    aws.dynamodb.put_item(TableName=names.replica_table, Item={"order_id": {"S": "o-4"}, "status": {"S": "junk"}})
    write(change("INSERT", order("o-4"), None, 1))
    assert live_copies(aws.dynamodb, names.replica_table)["o-4"] == order("o-4")


def test_a_call_collapses_each_order_to_its_newest_change_and_writes_100_orders_a_transaction(replica):
    names, aws, _, ctx, calls = replica
    changes = []
    for n in range(120):
        oid = f"b-{n:03d}"
        if n % 3 == 0:  # newest first, as a reordered batch may hold it
            changes += [change("MODIFY", order(oid, "shipped"), order(oid, "processing"), 3_000_000 + n),
                        change("INSERT", order(oid), None, 1_000_000 + n),
                        change("MODIFY", order(oid, "processing"), order(oid), 2_000_000 + n)]
        else:
            changes.append(change("INSERT", order(oid), None, 1_000_000 + n))
    replication.orders_replica(changes, ctx)
    assert calls == [("TransactWriteItems", 100), ("TransactWriteItems", 20)]
    copies = live_copies(aws.dynamodb, names.replica_table)
    assert len(copies) == 120
    assert all(copies[f"b-{n:03d}"]["status"] == ("shipped" if n % 3 == 0 else "pending") for n in range(120))
    # Sent again (a redelivery): every put is stale, the transaction is resent without them.
    calls.clear()
    replication.orders_replica(changes, ctx)
    assert [name for name, _ in calls] == ["TransactWriteItems", "TransactWriteItems"]
    assert live_copies(aws.dynamodb, names.replica_table) == copies


def test_a_missing_replica_table_fails_every_change_of_the_call(replica):
    _, _, _, ctx, _ = replica
    bad = Context(Settings(region="us-east-1", resources=Resources(replica_table="Nope-Replica")), ctx.clients)
    with pytest.raises(PartialBatchFailure) as info:
        replication.orders_replica([change("INSERT", order("m-1"), None, 1), change("INSERT", order("m-2"), None, 1)], bad)
    assert sorted(info.value.failures) == [0, 1]
    assert all("ResourceNotFoundException" in str(e) for e in info.value.failures.values())


# ---------------------------------------------------------------------------------------------
# With an in-memory client: what the handler sends


class RecordingDynamoDb:
    """Accepts every write; records what was sent."""

    def __init__(self) -> None:
        self.transactions: list[list[dict]] = []
        self.puts: list[dict] = []

    def transact_write_items(self, TransactItems):  # noqa: N803 - boto3's name
        self.transactions.append(TransactItems)
        return {}

    def put_item(self, **request):
        self.puts.append(request)
        return {}


class FakeClients:
    def __init__(self) -> None:
        self.replica = RecordingDynamoDb()


def test_an_order_with_an_attribute_the_replica_reserves_fails_alone():
    ctx = Context(Settings(region="us-east-1"), FakeClients())  # type: ignore[arg-type]
    clash = order("r-1", **{replication.DELETED: False})
    with pytest.raises(PartialBatchFailure) as info:
        replication.orders_replica([change("INSERT", clash, None, 1), change("INSERT", order("r-2"), None, 1)], ctx)
    assert list(info.value.failures) == [0] and isinstance(info.value.failures[0], OrderDataError)
    assert [p["Item"]["order_id"] for p in ctx.clients.replica.puts] == [{"S": "r-2"}]  # a lone put: no transaction
    assert ctx.clients.replica.puts[0]["TableName"] == "OrdersReplica"


def test_puts_are_chunked_under_the_transactions_4_mb():
    ddb = RecordingDynamoDb()
    size = _conditional.MAX_TRANSACTION_BYTES // 3 + 1  # two fit one transaction, three do not
    puts = [_conditional.ConditionalPut({"TableName": "T", "Item": {"k": {"S": str(i)}}}, [i], size) for i in range(5)]
    assert _conditional.put_all(ddb, puts, {}) == 0
    assert [len(t) for t in ddb.transactions] == [2, 2] and len(ddb.puts) == 1  # the last one alone: a PutItem


def test_the_tombstone_keeps_the_key_and_version_only():
    item = replication.replica_item(change("REMOVE", None, order("t-1", secret="x"), 1_700_000_000_123_456), 3600)
    assert set(item) == {"order_id", *replication.RESERVED}
    assert item[replication.EXPIRES_AT] == {"N": str(1_700_000_000 + 3600)}
    assert item[replication.VERSION_US] == {"N": "1700000000123456"} and item[replication.DELETED] == {"BOOL": True}


# ---------------------------------------------------------------------------------------------
# Done when: after a scripted history with duplicates and reorderings, the replica equals the table


def write_history(ddb, table: str, rng: random.Random) -> str:
    """Orders through every kind of change: created, status moves, an item edit, removals,
    a re-creation after a removal; every AttributeValue type on one of them. Returns the id
    of one removed order, whose removal the test delivers as a TTL expiry."""
    put = lambda item: ddb.put_item(TableName=table, Item={k: _ser.serialize(v) for k, v in item.items()})  # noqa: E731
    orders = {f"h-{n:02d}": new_order(f"h-{n:02d}", rng) for n in range(12)}
    orders["h-00"].update(gift_wrap=True, note=None, tags={"gift", "fragile"}, sizes={Decimal(1), Decimal("2.5")},
                          card=b"\x00\xffhello", cards={b"a", b"b"}, meta={"nested": [Decimal("1e-130"), "x", {"y": True, "z": b"\x01\x02"}]},
                          big=Decimal("9" * 38))
    for item in orders.values():
        put(item)
    for status in ("processing", "shipped", "delivered"):
        for oid, item in orders.items():
            if rng.random() < 0.8:
                item.update(status=status, updated_at=f"2026-12-01T00:00:0{len(status) % 10}+00:00")
                if status == "shipped":
                    item["tracking_number"] = f"1Z{oid}"
                put(item)
    ddb.update_item(TableName=table, Key={"order_id": {"S": "h-03"}}, UpdateExpression="SET #q = :q REMOVE tracking_number",
                    ExpressionAttributeNames={"#q": "quantity_note"}, ExpressionAttributeValues={":q": {"S": "edited"}})
    for oid in ("h-04", "h-05", "h-06"):
        ddb.delete_item(TableName=table, Key={"order_id": {"S": oid}})
    put(new_order("h-05", rng))  # re-created after its removal
    put(dict(orders["h-07"], status="cancelled", cancel_reason="customer request"))
    return "h-06"


def stream_docs(streams, stream_arn: str, table: str, ttl_removed: str) -> list[dict]:
    """The table's own DynamoDB Stream (moto), as KDS-for-DDB documents: increasing
    microsecond times per change, in the stream's order (the bridge does the same)."""
    shards = streams.describe_stream(StreamArn=stream_arn)["StreamDescription"]["Shards"]
    docs, us = [], count(1_795_000_000_000_000, 1000)
    for shard in shards:
        it = streams.get_shard_iterator(StreamArn=stream_arn, ShardId=shard["ShardId"],
                                        ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        while it:
            page = streams.get_records(ShardIterator=it)
            for record in page["Records"]:
                ddb = record["dynamodb"]
                oid = ddb["Keys"]["order_id"]["S"]
                doc = kds_record(record["eventName"], new=None, old=None, keys={"order_id": oid}, created_us=next(us),
                                 table=table, ttl=record["eventName"] == "REMOVE" and oid == ttl_removed,
                                 new_av=attribute_value_json(ddb["NewImage"]) if "NewImage" in ddb else None,
                                 old_av=attribute_value_json(ddb["OldImage"]) if "OldImage" in ddb else None)
                docs.append(doc)
            it = page.get("NextShardIterator") if page["Records"] else None
    return docs


def delivered(docs: list[dict], rng: random.Random) -> list[list[dict]]:
    """What KDS-for-DDB and the KCL may hand over: a third of the changes twice, everything
    shuffled, in batches of 1-15, and one batch delivered again at the end (a retry)."""
    stream = docs + rng.sample(docs, len(docs) // 3)
    rng.shuffle(stream)
    batches, i = [], 0
    while i < len(stream):
        n = rng.randint(1, 15)
        batches.append(stream[i:i + n])
        i += n
    return batches + [batches[len(batches) // 2]]


def overtaken(batches: list[list[dict]]) -> int:
    """How many changes arrive after a newer change of the same order."""
    newest: dict[str, int] = {}
    late = 0
    for doc in (d for b in batches for d in b):
        oid, us = doc["dynamodb"]["Keys"]["order_id"]["S"], doc["dynamodb"]["ApproximateCreationDateTime"]
        late += us < newest.get(oid, 0)
        newest[oid] = max(us, newest.get(oid, 0))
    return late


def run_history(pipeline: Pipeline, batches: list[list[dict]]) -> list:
    results, n = [], count(1)
    for batch in batches:
        # Every delivery is its own Kinesis record: a duplicate has a sequence number of its own.
        results += pipeline.process([kcl_record(doc, sequence_number(next(n))) for doc in batch], "shardId-000000000000")
    return results


@pytest.mark.parametrize("seed", [1, 2])
def test_after_a_history_with_duplicates_and_reorderings_the_replica_equals_the_table(moto_resources, seed):
    """The production pipeline (build_pipeline: every route, the real idempotency store and
    dead-letter queue on moto), fed the table's own changes out of order."""
    names, aws, created, env = moto_resources
    rng = random.Random(seed)
    ttl_removed = write_history(aws.dynamodb, names.orders_table, rng)
    docs = stream_docs(aws.dynamodbstreams, created.orders_stream_arn, names.orders_table, ttl_removed)
    batches = delivered(docs, rng)
    assert overtaken(batches) >= 10, "the delivery must really reorder changes of an order"
    settings = load(env)
    session = boto3.session.Session(aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1")
    results = run_history(build_pipeline(settings, Clients(settings, session)), batches)

    assert not [r for r in results if r.outcome is Outcome.DEAD_LETTERED]
    assert all(dict(r.routes)[ROUTE] is Outcome.DONE for r in results)
    table = scan(aws.dynamodb, names.orders_table)
    assert {"h-04", "h-06"}.isdisjoint(table) and "h-05" in table
    assert live_copies(aws.dynamodb, names.replica_table) == table  # item for item, value for value
    assert live_copies(aws.dynamodb, names.replica_table)["h-00"]["card"] == b"\x00\xffhello"
    tombstones = {oid for oid, item in scan(aws.dynamodb, names.replica_table).items() if replication.DELETED in item}
    assert tombstones == {"h-04", "h-06"}
    # `make run-local`'s summary counts the same (tombstones are not orders).
    snap = Summary({"s3": aws.s3, "ses": aws.ses, "sqs": aws.sqs, "dynamodb": aws.dynamodb}, names).snapshot(0)
    assert snap.orders_in_table == snap.orders_in_replica == len(table)
    assert f"orders/replica={len(table)}/{len(table)}" in one_line(snap, 0)


def test_with_ttl_deletes_off_an_expired_order_keeps_its_last_state_under_a_route_filter(moto_resources):
    """Only the replica route (as `replay --routes replication.orders_replica` selects it)."""
    names, aws, created, env = moto_resources
    rng = random.Random(3)
    ttl_removed = write_history(aws.dynamodb, names.orders_table, rng)
    docs = stream_docs(aws.dynamodbstreams, created.orders_stream_arn, names.orders_table, ttl_removed)
    settings = load({**env, "ORDERS_CDC_REPLICA_TTL_DELETES": "false"})
    routes = [r for r in all_routes(settings.resources, replica_ttl_deletes=settings.replica_ttl_deletes) if r.name == ROUTE]
    session = boto3.session.Session(aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1")
    dlq = InMemoryDeadLetterSink()
    pipeline = Pipeline(router=Router(routes), ctx=Context(settings, Clients(settings, session)), dead_letters=dlq,
                        retry=RetryPolicy(max_attempts=2, base_seconds=0, max_seconds=0), sleep=lambda s: None)
    results = run_history(pipeline, delivered(docs, rng))

    assert not dlq.letters
    ttl_results = [r for r in results if r.change.ttl_delete]
    assert ttl_results and all(r.outcome is Outcome.SKIPPED for r in ttl_results)
    last = [d for d in docs if d["dynamodb"]["Keys"]["order_id"]["S"] == ttl_removed and "NewImage" in d["dynamodb"]][-1]
    expected = {**scan(aws.dynamodb, names.orders_table),
                ttl_removed: {k: _de.deserialize(v) for k, v in _wire_to_boto(last["dynamodb"]["NewImage"]).items()}}
    assert live_copies(aws.dynamodb, names.replica_table) == expected


def _wire_to_boto(image: dict) -> dict:
    """Wire-form AttributeValues (B as base64 text) as boto3 hands them (B as bytes)."""
    from orders_cdc.attrvalue import marshal, unmarshal_map

    return {k: marshal(v) for k, v in unmarshal_map(image).items()}


def test_a_backfill_by_replay_from_the_streams_start_builds_the_same_replica(moto_resources):
    """`orders-cdc replay --routes replication.orders_replica` from before the first change,
    against a new, empty replica: the table's whole history on the Kinesis stream, in order."""
    import subprocess
    import sys
    from pathlib import Path

    names, aws, created, env = moto_resources
    rng = random.Random(4)
    ttl_removed = write_history(aws.dynamodb, names.orders_table, rng)
    docs = stream_docs(aws.dynamodbstreams, created.orders_stream_arn, names.orders_table, ttl_removed)
    for start in range(0, len(docs), 100):
        aws.kinesis.put_records(StreamName=names.stream, Records=[
            {"Data": orjson.dumps(d), "PartitionKey": d["dynamodb"]["Keys"]["order_id"]["S"]}
            for d in docs[start:start + 100]])
    assert scan(aws.dynamodb, names.replica_table) == {}

    proc = subprocess.run([sys.executable, "-m", "orders_cdc.cli", "replay", "--from", "-10m", "--json",
                           "--routes", ROUTE], cwd=Path(__file__).resolve().parents[2], capture_output=True,
                          timeout=180, env={**env, "ORDERS_CDC_STREAM": names.stream})
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    summary = orjson.loads(proc.stdout)
    assert summary["records"] == len(docs) and summary["routes"] == {ROUTE: {"done": len(docs)}}
    table = scan(aws.dynamodb, names.orders_table)
    assert live_copies(aws.dynamodb, names.replica_table) == table  # item for item, value for value
