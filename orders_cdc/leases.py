"""The KCL lease table, read and (for replay) edited from outside the daemon.

The table also holds coordinator entries in KCL 3.x (leader lock, worker metrics,
migration state): only items whose entityType is absent or LEASE are shard leases.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone

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


def reset_to_timestamp(dynamodb, table: str, leases: list[Lease]) -> None:
    """Point every lease at AT_TIMESTAMP. The daemon then opens its iterator at the
    configured initialPositionInStreamExtended time (`orders-cdc run --from TIME`).

    Conditional on the counter we read: a worker that renewed meanwhile wins, and we stop.
    """
    for lease in leases:
        try:
            dynamodb.update_item(
                TableName=table,
                Key={"leaseKey": {"S": lease.shard_id}},
                UpdateExpression="SET #cp = :ts, #sub = :zero REMOVE #pcp, #psub",
                ConditionExpression="#counter = :counter",
                ExpressionAttributeNames={"#cp": "checkpoint", "#sub": "checkpointSubSequenceNumber",
                                          "#pcp": "pendingCheckpoint", "#psub": "pendingCheckpointSubSequenceNumber",
                                          "#counter": "leaseCounter"},
                ExpressionAttributeValues={":ts": {"S": "AT_TIMESTAMP"}, ":zero": {"N": "0"},
                                           ":counter": {"N": str(lease.counter)}},
            )
        except ClientError as exc:
            if error_code(exc) == "ConditionalCheckFailedException":
                raise SettingsError(f"lease {lease.shard_id} changed while resetting it: stop every worker first") from None
            raise


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


def check_within_retention(kinesis, stream: str, when: datetime) -> None:
    hours = kinesis.describe_stream_summary(StreamName=stream)["StreamDescriptionSummary"]["RetentionPeriodHours"]
    oldest = datetime.now(timezone.utc).timestamp() - hours * 3600
    if when.timestamp() < oldest:
        raise SettingsError(f"{when.isoformat()} is older than the stream's {hours} h retention: those records are gone")
    if when > datetime.now(timezone.utc):
        raise SettingsError(f"{when.isoformat()} is in the future")
