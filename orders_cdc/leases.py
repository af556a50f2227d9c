"""The KCL lease table, read and (for replay) edited from outside the daemon.

The table also holds coordinator entries in KCL 3.x (leader lock, worker metrics,
migration state): only items whose entityType is absent or LEASE are shard leases.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from botocore.exceptions import ClientError

from orders_cdc.errors import SettingsError, error_code


@dataclass(frozen=True, slots=True)
class Lease:
    shard_id: str
    owner: str
    counter: int
    checkpoint: str
    sub_sequence: int
    parents: tuple[str, ...] = ()


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
                parents=tuple(sorted(item.get("parentShardId", {}).get("SS", []))),
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


# -- `orders-cdc status` ------------------------------------------------------------------------

SHARD_END = "SHARD_END"


def stream_shards(kinesis, stream: str) -> dict[str, dict]:
    """The stream's shards by id, as ListShards gives them (closed ones included while in retention)."""
    shards, kwargs = {}, {"StreamName": stream}
    while True:
        try:
            page = kinesis.list_shards(**kwargs)
        except ClientError as exc:
            if error_code(exc) == "ResourceNotFoundException":
                raise SettingsError(f"stream {stream!r} not found") from None
            raise
        shards.update({s["ShardId"]: s for s in page.get("Shards", [])})
        if not page.get("NextToken"):
            return shards
        kwargs = {"NextToken": page["NextToken"]}


def checkpoint_arrival(kinesis, stream: str, lease: Lease) -> datetime | None:
    """When the newest record the checkpoint covers reached the stream: the lease itself
    keeps no time of its last update. None when the checkpoint is not a sequence number."""
    if not lease.checkpoint.isdigit():
        return None
    iterator = kinesis.get_shard_iterator(StreamName=stream, ShardId=lease.shard_id, ShardIteratorType="AT_SEQUENCE_NUMBER",
                                          StartingSequenceNumber=lease.checkpoint)["ShardIterator"]
    records = kinesis.get_records(ShardIterator=iterator, Limit=1).get("Records", [])
    return records[0]["ApproximateArrivalTimestamp"].astimezone(timezone.utc) if records else None


def shard_rows(kinesis, stream: str, leases: list[Lease]) -> list[dict]:
    """One row per shard of the stream or the lease table: owner, checkpoint, when the
    checkpointed record arrived, lag behind the tip, closed or open, parents.

    Per open, checkpointed shard this costs two GetShardIterator + GetRecords pairs (the
    shard's read limit is 5 GetRecords a second, which the worker's polling shares: a
    throttled read shows as an error in that row, not a failure of the command)."""
    shards = stream_shards(kinesis, stream)
    by_id = {lease.shard_id: lease for lease in leases}
    rows = []
    for shard_id in sorted(set(shards) | set(by_id)):
        shard, lease = shards.get(shard_id), by_id.get(shard_id)
        ending = (shard or {}).get("SequenceNumberRange", {}).get("EndingSequenceNumber")
        parents = lease.parents if lease and lease.parents else tuple(
            p for p in ((shard or {}).get("ParentShardId"), (shard or {}).get("AdjacentParentShardId")) if p)
        checkpoint = lease.checkpoint if lease else ""
        row = {"shard": shard_id, "owner": lease.owner if lease else "", "checkpoint": checkpoint,
               "sub_sequence": lease.sub_sequence if lease else 0, "lease_counter": lease.counter if lease else None,
               "state": "ended" if checkpoint == SHARD_END else ("closed" if ending or shard is None else "open"),
               "parents": list(parents), "checkpoint_arrival": None, "millis_behind": None, "error": None}
        if checkpoint == SHARD_END:
            row["millis_behind"] = 0  # every record of it is processed
        elif lease is not None and shard is not None:
            try:
                row["millis_behind"] = millis_behind(kinesis, stream, lease)
                arrival = checkpoint_arrival(kinesis, stream, lease)
                row["checkpoint_arrival"] = arrival.isoformat() if arrival else None
            except ClientError as exc:
                from orders_cdc.errors import describe

                row["error"] = describe(exc)
        rows.append(row)
    return rows


def worker_metric_reports(dynamodb, lease_table: str, metrics_table: str | None) -> dict[str, float]:
    """Worker id -> when it last reported its metrics to the lease assigner (epoch seconds):
    KCL 3.x workers do every 30 s, leases or none. Empty where there is no such table
    (2.x-compatible mode)."""
    reports: dict[str, float] = {}
    for table, key, wanted in ((metrics_table, "wid", None), (lease_table, "leaseKey", "WORKER_METRIC_STATS")):
        if not table:
            continue
        kwargs = {"TableName": table}
        try:
            while True:
                page = dynamodb.scan(**kwargs)
                for item in page.get("Items", []):
                    if wanted and item.get("entityType", {}).get("S") != wanted:
                        continue
                    if key in item and "lut" in item:
                        value = float(item["lut"]["N"])
                        reports[item[key]["S"]] = value / 1000 if value > 1e11 else value
                if "LastEvaluatedKey" not in page:
                    break
                kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
        except ClientError as exc:
            if error_code(exc) != "ResourceNotFoundException":
                raise
    return reports


def worker_rows(leases: list[Lease], reports: dict[str, float], now: float) -> list[dict]:
    """Per worker: the open leases it holds (a SHARD_END lease waits for clean-up and is
    not work), and how long ago it last reported to the lease assigner."""
    held: dict[str, list[str]] = {}
    for lease in leases:
        if lease.owner and lease.checkpoint != SHARD_END:
            held.setdefault(lease.owner, []).append(lease.shard_id)
    return [{"worker": worker, "leases": len(held.get(worker, [])), "shards": sorted(held.get(worker, [])),
             "reported_seconds_ago": round(now - reports[worker], 1) if worker in reports else None}
            for worker in sorted(set(held) | set(reports))]


def dead_letter_status(sqs, cloudwatch, queue: str, now: datetime | None = None) -> dict:
    """Depth from the queue's attributes (ApproximateNumberOfMessages: visible;
    ...NotVisible: being read). The oldest letter's age is not a queue attribute: it is the
    CloudWatch metric ApproximateAgeOfOldestMessage (AWS/SQS, 1-minute datapoints), read
    here when there is one from the last 15 minutes; else None. Peeking at messages would
    count as receives, so it is not done."""
    from orders_cdc.errors import describe

    status = {"queue": queue, "visible": None, "in_flight": None, "oldest_age_seconds": None, "oldest_age_source": None,
              "error": None}
    try:
        url = sqs.get_queue_url(QueueName=queue)["QueueUrl"]
        attrs = sqs.get_queue_attributes(
            QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    except ClientError as exc:
        missing = error_code(exc) in ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist")
        status["error"] = f"queue {queue!r} not found" if missing else describe(exc)
        return status
    status["visible"] = int(attrs.get("ApproximateNumberOfMessages", 0))
    status["in_flight"] = int(attrs.get("ApproximateNumberOfMessagesNotVisible", 0))
    now = now or datetime.now(timezone.utc)
    try:
        points = cloudwatch.get_metric_statistics(
            Namespace="AWS/SQS", MetricName="ApproximateAgeOfOldestMessage",
            Dimensions=[{"Name": "QueueName", "Value": queue}],
            StartTime=now - timedelta(minutes=15), EndTime=now, Period=60, Statistics=["Maximum"])["Datapoints"]
    except ClientError as exc:
        status["oldest_age_source"] = f"CloudWatch: {describe(exc)}"
        return status
    if points:
        latest = max(points, key=lambda p: p["Timestamp"])
        status["oldest_age_seconds"] = latest["Maximum"]
        status["oldest_age_source"] = f"CloudWatch at {latest['Timestamp'].astimezone(timezone.utc).isoformat()}"
    else:
        status["oldest_age_source"] = "no CloudWatch datapoint in the last 15 min"
    return status
