"""The KCL lease table, read and (for replay) edited from outside the daemon.

The table also holds coordinator entries in KCL 3.x (leader lock, worker metrics,
migration state): only items whose entityType is absent or LEASE are shard leases.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from botocore.exceptions import ClientError

from orders_cdc.errors import SettingsError, error_code


@dataclass(frozen=True, slots=True)
class Lease:
    shard_id: str
    owner: str
    counter: int
    checkpoint: str
    sub_sequence: int


def read_leases(dynamodb, table: str) -> list[Lease]:
    leases, kwargs = [], {"TableName": table, "ConsistentRead": True}
    while True:
        try:
            page = dynamodb.scan(**kwargs)
        except ClientError as exc:
            if error_code(exc) == "ResourceNotFoundException":
                raise SettingsError(f"lease table {table!r} not found: has the consumer ever run?") from None
            raise
        for item in page["Items"]:
            if item.get("entityType", {}).get("S", "LEASE") != "LEASE" or "leaseCounter" not in item:
                continue
            leases.append(Lease(
                shard_id=item["leaseKey"]["S"],
                owner=item.get("leaseOwner", {}).get("S", ""),
                counter=int(item["leaseCounter"]["N"]),
                checkpoint=item.get("checkpoint", {}).get("S", ""),
                sub_sequence=int(item.get("checkpointSubSequenceNumber", {}).get("N", "0")),
            ))
        if "LastEvaluatedKey" not in page:
            return sorted(leases, key=lambda lease: lease.shard_id)
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def renewing_workers(dynamodb, table: str, failover_seconds: float, sleep=time.sleep) -> dict[str, str]:
    """Leases whose counter moves within a failover period: a live worker holds them."""
    before = {lease.shard_id: lease for lease in read_leases(dynamodb, table)}
    sleep(failover_seconds)
    return {lease.shard_id: lease.owner for lease in read_leases(dynamodb, table)
            if lease.shard_id in before and lease.counter != before[lease.shard_id].counter}


def reset_to_timestamp(dynamodb, table: str, leases: list[Lease]) -> int:
    """Point every lease at AT_TIMESTAMP; the daemon then opens its iterator at the configured
    initialPositionInStreamExtended time (`orders-cdc run --from TIME`). Returns how many
    leases it changed.

    All or nothing per 100 leases (one TransactWriteItems, each item conditional on the
    counter we read: a worker that renewed meanwhile cancels the transaction), and
    resumable: a lease already at AT_TIMESTAMP is left alone, so running it again after a
    failure finishes the job.
    """
    todo = [lease for lease in leases if lease.checkpoint != "AT_TIMESTAMP"]
    for start in range(0, len(todo), 100):
        chunk = todo[start:start + 100]
        try:
            dynamodb.transact_write_items(TransactItems=[{"Update": {
                "TableName": table,
                "Key": {"leaseKey": {"S": lease.shard_id}},
                "UpdateExpression": "SET #cp = :ts, #sub = :zero REMOVE #pcp, #psub",
                "ConditionExpression": "#counter = :counter",
                "ExpressionAttributeNames": {"#cp": "checkpoint", "#sub": "checkpointSubSequenceNumber",
                                             "#pcp": "pendingCheckpoint",
                                             "#psub": "pendingCheckpointSubSequenceNumber",
                                             "#counter": "leaseCounter"},
                "ExpressionAttributeValues": {":ts": {"S": "AT_TIMESTAMP"}, ":zero": {"N": "0"},
                                              ":counter": {"N": str(lease.counter)}},
            }} for lease in chunk])
        except ClientError as exc:
            if error_code(exc) != "TransactionCanceledException":
                raise
            reasons = exc.response.get("CancellationReasons", [])
            moved = [lease.shard_id for lease, r in zip(chunk, reasons) if r.get("Code") == "ConditionalCheckFailed"]
            raise SettingsError(
                f"lease(s) {', '.join(moved) or '?'} changed while resetting: is a worker running? "
                f"{start} of {len(todo)} lease(s) reset, {len(leases) - len(todo)} already were; "
                f"stop every worker and run this again to finish") from None
    return len(todo)


def millis_behind(kinesis, stream: str, lease: Lease) -> int | None:
    """How far the checkpoint is behind the shard's tip, as Kinesis itself reports it."""
    if not lease.checkpoint.isdigit():
        kind = {"TRIM_HORIZON": "TRIM_HORIZON", "LATEST": "LATEST"}.get(lease.checkpoint)
        if kind is None:
            return None
        iterator = kinesis.get_shard_iterator(StreamName=stream, ShardId=lease.shard_id, ShardIteratorType=kind)
    else:
        iterator = kinesis.get_shard_iterator(StreamName=stream, ShardId=lease.shard_id,
                                              ShardIteratorType="AFTER_SEQUENCE_NUMBER",
                                              StartingSequenceNumber=lease.checkpoint)
    reply = kinesis.get_records(ShardIterator=iterator["ShardIterator"], Limit=1)
    return reply.get("MillisBehindLatest")


def retention_hours(kinesis, stream: str) -> int:
    try:
        summary = kinesis.describe_stream_summary(StreamName=stream)["StreamDescriptionSummary"]
    except ClientError as exc:
        if error_code(exc) == "ResourceNotFoundException":
            raise SettingsError(f"stream {stream!r} not found") from None
        raise
    return summary["RetentionPeriodHours"]
