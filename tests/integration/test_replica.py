"""The replica through the real path: table writes -> local bridge -> LocalStack Kinesis ->
the real KCL daemon -> record_processor.py -> replica table (moto). Then every record of the
stream is put onto it again: each order's newest change, then (in later batches) its older
ones, newest first. The replica still equals the table, item for item."""

from __future__ import annotations

import orjson
import pytest
from boto3.dynamodb.types import TypeDeserializer

from orders_cdc.local.runner import LocalRun, LocalRunConfig, wait_until
from orders_cdc.local.stack import PROJECT_ROOT, LocalStackConfig, free_port
from processors import replication
from tests.faults.harness import History

pytestmark = pytest.mark.integration
_de = TypeDeserializer()


def items(ddb, table: str) -> dict[str, dict]:
    out, kwargs = {}, {"TableName": table, "ConsistentRead": True}
    while True:
        page = ddb.scan(**kwargs)
        for raw in page["Items"]:
            out[raw["order_id"]["S"]] = {k: _de.deserialize(v) for k, v in raw.items()}
        if "LastEvaluatedKey" not in page:
            return out
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def live_copies(ddb, table: str) -> dict[str, dict]:
    return {oid: {k: v for k, v in item.items() if k not in replication.RESERVED}
            for oid, item in items(ddb, table).items() if replication.DELETED not in item}


def stream_records(kinesis, stream: str) -> list[tuple[bytes, str]]:
    """Every record on the stream now, (data, partition key), shard by shard in order."""
    out = []
    for shard in kinesis.list_shards(StreamName=stream)["Shards"]:
        it = kinesis.get_shard_iterator(StreamName=stream, ShardId=shard["ShardId"],
                                        ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        while it:
            page = kinesis.get_records(ShardIterator=it, Limit=1000)
            out += [(r["Data"], r["PartitionKey"]) for r in page["Records"]]
            it = page.get("NextShardIterator") if page["Records"] or page.get("MillisBehindLatest") else None
    return out


def checkpoints(run: LocalRun) -> dict[str, int]:
    leases = run.client("dynamodb").scan(TableName=run.cfg.application, ConsistentRead=True)["Items"]
    return {i["leaseKey"]["S"]: int(i["checkpoint"]["S"]) for i in leases
            if i.get("checkpoint", {}).get("S", "").isdigit()}


def put_again(run: LocalRun, records: list[tuple[bytes, str]]) -> None:
    """Put `records` onto the stream in this order and wait until the daemon has checkpointed
    past them: the checkpoint passes a record only once every route has settled it."""
    kinesis, last = run.client("kinesis"), {}
    for start in range(0, len(records), 100):
        chunk = records[start:start + 100]
        reply = kinesis.put_records(StreamName=run.cfg.names.stream,
                                    Records=[{"Data": d, "PartitionKey": k} for d, k in chunk])
        assert not reply.get("FailedRecordCount"), reply
        for r in reply["Records"]:
            last[r["ShardId"]] = max(last.get(r["ShardId"], 0), int(r["SequenceNumber"]))
    wait_until(lambda: all(checkpoints(run).get(s, 0) >= n for s, n in last.items()), 240, 2.0,
               "the daemon to checkpoint past the records put again")


def test_the_real_daemon_keeps_the_replica_equal_to_the_table_through_duplicates_and_reordering():
    cfg = LocalRunConfig(stack=LocalStackConfig(root=PROJECT_ROOT / ".local" / "test-replica",
                                                moto_port=free_port(), localstack_port=free_port()),
                         extra_env={"ORDERS_CDC_CHECKPOINT_EVERY_SECONDS": "1"})
    with LocalRun(cfg) as run:
        ddb, names = run.client("dynamodb"), run.cfg.names
        history = History(orders=8, prefix="rep")
        history.write(run, rate=20)
        for oid in ("rep-0001", "rep-0002"):
            ddb.delete_item(TableName=names.orders_table, Key={"order_id": {"S": oid}})
        table = items(ddb, names.orders_table)
        assert len(table) == 6
        wait_until(lambda: live_copies(ddb, names.replica_table) == table, 240, 2.0, "the replica to equal the table")

        # What KDS-for-DDB may do: deliver again, out of order. First each order's newest
        # change once more; once that is processed, all of its older changes, newest first
        # (so that a batch cannot simply keep the newest of what it holds).
        kinesis = run.client("kinesis")
        records = stream_records(kinesis, names.stream)
        assert len(records) >= len(history.versions) + 2
        newest = {orjson.loads(data)["dynamodb"]["Keys"]["order_id"]["S"]: (data, key) for data, key in records}
        older = [r for r in records if r not in newest.values()][::-1]
        for batch in (list(newest.values()), older):
            put_again(run, batch)

        assert live_copies(ddb, names.replica_table) == items(ddb, names.orders_table) == table
        tombstones = {oid for oid, item in items(ddb, names.replica_table).items() if replication.DELETED in item}
        assert tombstones == {"rep-0001", "rep-0002"}
