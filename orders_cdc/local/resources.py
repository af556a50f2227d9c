"""Create every AWS resource the project uses, on the local stack. Idempotent: safe to re-run.

Kinesis lives on LocalStack; everything else on moto server (see stack.py for why).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.exceptions import ClientError

from orders_cdc.deadletter import MAX_MESSAGE_BYTES
from orders_cdc.local.stack import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY
from orders_cdc.settings import Resources
from processors import replication

log = logging.getLogger(__name__)

# moto does not check IAM; Firehose still wants a role ARN.
_FIREHOSE_ROLE = "arn:aws:iam::123456789012:role/orders-cdc-firehose"


@dataclass(frozen=True, slots=True)
class ResourceNames(Resources):
    """The resources the processor uses (`Resources`, the same names it reads from its
    settings) plus what only the local stack creates: the stream and the Firehose bucket."""

    stream: str = "orders-cdc"
    shards: int = 2
    idempotency_ttl_attribute: str = "expires_at"
    analytics_bucket: str = "orders-cdc-analytics"

    @classmethod
    def unique(cls, suffix: str, **kw: Any) -> ResourceNames:
        """Every name made unique with ``suffix``: test runs share one moto server."""
        return cls(
            stream=f"s-{suffix}", orders_table=f"Orders-{suffix}", inventory_table=f"Inventory-{suffix}",
            product_orders_table=f"ProductOrders-{suffix}", order_metrics_table=f"OrderMetrics-{suffix}",
            product_metrics_table=f"ProductMetrics-{suffix}", idempotency_table=f"Idempotency-{suffix}",
            dlq_queue=f"dlq-{suffix}", refund_queue=f"refunds-{suffix}", analytics_bucket=f"analytics-{suffix}",
            dead_letter_bucket=f"dead-letters-{suffix}",
            firehose_stream=f"analytics-{suffix}", sender_email=f"orders-{suffix}@example.com",
            replica_table=f"OrdersReplica-{suffix}", **kw,
        )


@dataclass(frozen=True, slots=True)
class LocalClients:
    kinesis: Any
    dynamodb: Any
    dynamodbstreams: Any
    sqs: Any
    s3: Any
    firehose: Any
    ses: Any

    @classmethod
    def from_endpoints(cls, endpoints: Mapping[str, str]) -> LocalClients:
        """boto3 clients with explicit endpoints, region and dummy credentials (never real AWS)."""
        session = boto3.session.Session(
            aws_access_key_id=ACCESS_KEY_ID, aws_secret_access_key=SECRET_ACCESS_KEY, region_name=REGION,
        )
        return cls(**{name: session.client(name, endpoint_url=endpoints[name])  # type: ignore[call-overload]
                      for name in cls.__dataclass_fields__})


@dataclass(frozen=True, slots=True)
class CreatedResources:
    stream_arn: str
    orders_stream_arn: str
    queue_urls: dict[str, str]


def create_resources(
    clients: LocalClients | Mapping[str, str], names: ResourceNames = ResourceNames(),
) -> CreatedResources:
    """Create (or find) every resource; ``clients`` may be a LocalClients or stack.endpoints."""
    c = clients if isinstance(clients, LocalClients) else LocalClients.from_endpoints(clients)
    stream_arn = _kinesis_stream(c.kinesis, names.stream, names.shards)
    orders_stream_arn = _table(c.dynamodb, names.orders_table, [("order_id", "S")], stream=True)
    _table(c.dynamodb, names.inventory_table, [("product_id", "S")])
    _table(c.dynamodb, names.product_orders_table, [("product_id", "S"), ("order_id", "S")])
    _table(c.dynamodb, names.order_metrics_table, [("day", "S")])
    _table(c.dynamodb, names.product_metrics_table, [("product_id", "S"), ("day", "S")])
    _table(c.dynamodb, names.idempotency_table, [("id", "S")])
    _ttl(c.dynamodb, names.idempotency_table, names.idempotency_ttl_attribute)
    _ttl(c.dynamodb, names.product_orders_table, "expires_at")  # the view's tombstones
    # The replica has the orders table's key; TTL clears its tombstones. Locally it sits on
    # the same moto server (in AWS it may be in another region or account).
    _table(c.dynamodb, names.replica_table, [("order_id", "S")])
    _ttl(c.dynamodb, names.replica_table, replication.EXPIRES_AT)
    # create_queue is idempotent when the attributes match.
    queue_urls = {q: c.sqs.create_queue(QueueName=q, Attributes={"MaximumMessageSize": str(MAX_MESSAGE_BYTES)})["QueueUrl"]
                  for q in (names.dlq_queue, names.refund_queue)}
    _bucket(c.s3, names.analytics_bucket)
    _bucket(c.s3, names.dead_letter_bucket)
    _firehose(c.firehose, names.firehose_stream, names.analytics_bucket)
    c.ses.verify_email_identity(EmailAddress=names.sender_email)  # idempotent; moto verifies at once
    log.info("local resources ready: stream %s, table %s", stream_arn, names.orders_table)
    return CreatedResources(stream_arn, orders_stream_arn or "", queue_urls)


def _wait(what: str, check: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while (result := check()) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout:.0f}s")
        time.sleep(0.1)  # botocore's waiters poll every 10 s: far too slow locally
    return result


def _kinesis_stream(kinesis: Any, name: str, shards: int) -> str:
    try:
        kinesis.create_stream(StreamName=name, ShardCount=shards)
        log.info("created Kinesis stream %s (%d shards)", name, shards)
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "ResourceInUseException":
            raise

    def active() -> dict[str, Any] | None:
        summary = kinesis.describe_stream_summary(StreamName=name)["StreamDescriptionSummary"]
        return summary if summary["StreamStatus"] == "ACTIVE" else None

    summary = _wait(f"Kinesis stream {name}", active)
    if summary["OpenShardCount"] != shards:
        log.warning("stream %s already exists with %d open shards (wanted %d); left as is",
                    name, summary["OpenShardCount"], shards)
    return str(summary["StreamARN"])


def _table(ddb: Any, name: str, key: list[tuple[str, str]], stream: bool = False) -> str | None:
    """Create a PAY_PER_REQUEST table keyed (hash[, range]); returns its stream ARN if streamed."""
    spec: dict[str, Any] = {}
    if stream:
        spec["StreamSpecification"] = {"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"}
    try:
        ddb.create_table(
            TableName=name,
            KeySchema=[{"AttributeName": a, "KeyType": t} for (a, _), t in zip(key, ("HASH", "RANGE"))],
            AttributeDefinitions=[{"AttributeName": a, "AttributeType": t} for a, t in key],
            BillingMode="PAY_PER_REQUEST",
            **spec,
        )
        log.info("created table %s", name)
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "ResourceInUseException":
            raise

    def active() -> dict[str, Any] | None:
        table = ddb.describe_table(TableName=name)["Table"]
        return table if table["TableStatus"] == "ACTIVE" else None

    table = _wait(f"table {name}", active)
    if stream and not table.get("StreamSpecification", {}).get("StreamEnabled"):
        # Someone made the table without a stream: the bridge needs one.
        ddb.update_table(TableName=name, StreamSpecification=spec["StreamSpecification"])
        table = _wait(f"table {name} stream", lambda: (t := ddb.describe_table(TableName=name)["Table"])
                      if t.get("LatestStreamArn") else None)
    return table.get("LatestStreamArn")


def _ttl(ddb: Any, table: str, attribute: str) -> None:
    current = ddb.describe_time_to_live(TableName=table)["TimeToLiveDescription"]
    if current.get("TimeToLiveStatus") in ("ENABLED", "ENABLING"):
        return  # enabling twice is a ValidationException
    ddb.update_time_to_live(
        TableName=table, TimeToLiveSpecification={"Enabled": True, "AttributeName": attribute},
    )


def _bucket(s3: Any, name: str) -> None:
    try:
        s3.create_bucket(Bucket=name)  # us-east-1: no LocationConstraint
    except ClientError as exc:
        if exc.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise


def _firehose(firehose: Any, name: str, bucket: str) -> None:
    try:
        firehose.create_delivery_stream(
            DeliveryStreamName=name,
            DeliveryStreamType="DirectPut",
            ExtendedS3DestinationConfiguration={
                "RoleARN": _FIREHOSE_ROLE,
                "BucketARN": f"arn:aws:s3:::{bucket}",
                "Prefix": "orders/",
                "ErrorOutputPrefix": "errors/",
                # The smallest AWS accepts; moto writes every batch to S3 at once anyway.
                "BufferingHints": {"SizeInMBs": 1, "IntervalInSeconds": 0},
                "CompressionFormat": "UNCOMPRESSED",
            },
        )
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "ResourceInUseException":
            raise
