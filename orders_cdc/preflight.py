"""Checks before the JVM starts, so a wrong stream, endpoint or resource is one clear line,
not a wall of Java stack traces a minute later, or a child failing in a loop.

Kinesis and the lease table are probed where the daemon will reach them (its effective
properties: the environment laid over the file); the downstream tables, queues, delivery
stream and bucket where the handlers will (the environment's endpoints).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from datetime import datetime

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from orders_cdc.errors import Failure, SettingsError, classify, error_code
from orders_cdc.settings import Settings

_QUICK = Config(retries={"mode": "standard", "total_max_attempts": 2}, connect_timeout=3, read_timeout=5)


def preflight(settings: Settings, values: Mapping[str, str]) -> None:
    """The first problem `checks` finds, as a SettingsError."""
    for problem in checks(settings, values):
        raise SettingsError(problem)


def checks(settings: Settings, values: Mapping[str, str]) -> Iterator[str]:
    """One line per problem with the stream, the lease table and every downstream resource."""
    session = boto3.session.Session(region_name=settings.region)
    stream = values.get("streamName") or values["streamArn"].rsplit("/", 1)[-1]
    lease_table = values.get("tableName", values["applicationName"])
    kinesis_at = values.get("kinesisEndpoint") or settings.endpoint("kinesis")
    dynamodb_at = values.get("dynamoDBEndpoint") or settings.endpoint("dynamodb")
    kinesis = session.client("kinesis", endpoint_url=kinesis_at, config=_QUICK)
    dynamodb = session.client("dynamodb", endpoint_url=dynamodb_at, config=_QUICK)

    where = kinesis_at or f"Kinesis in {settings.region}"
    try:
        summary = kinesis.describe_stream_summary(StreamName=stream)["StreamDescriptionSummary"]
    except NoCredentialsError:
        yield "no AWS credentials found (environment, profile or task role)"
        return
    except EndpointConnectionError:
        yield f"cannot reach Kinesis at {where}"
        summary = None
    except ClientError as exc:
        code = error_code(exc)
        yield (f"stream {stream!r} not found at {where}" if code == "ResourceNotFoundException"
               else f"Kinesis at {where} refused DescribeStreamSummary: {code}")
        summary = None
    if summary is not None:
        if summary["StreamStatus"] not in ("ACTIVE", "UPDATING"):
            yield f"stream {stream!r} is {summary['StreamStatus']}, not ACTIVE"
        retention = int(summary.get("RetentionPeriodHours") or 24) * 3600
        if settings.idempotency_ttl_seconds < retention:
            # A change redelivered (or replayed) after its done-marker expired is done again:
            # a second email, inventory counted twice.
            yield (f"ORDERS_CDC_IDEMPOTENCY_TTL_SECONDS={settings.idempotency_ttl_seconds} is shorter than the"
                   f" stream's retention ({retention} s): redelivered changes would be done twice")

    yield from _lease_table(settings, dynamodb, lease_table, dynamodb_at or f"DynamoDB in {settings.region}")
    yield from _downstream(settings, session)


def _lease_table(settings: Settings, dynamodb, table: str, where: str) -> Iterator[str]:
    try:
        dynamodb.describe_table(TableName=table)
    except EndpointConnectionError:
        yield f"cannot reach DynamoDB (lease table) at {where}"
        return
    except ClientError as exc:
        if error_code(exc) != "ResourceNotFoundException":  # the daemon creates its lease table
            yield f"DynamoDB at {where} refused DescribeTable: {error_code(exc)}"
        return
    from orders_cdc.leases import read_leases

    # After `orders-cdc rewind`, the daemon opens AT_TIMESTAMP leases at its configured
    # timestamp; without one it loops on a NullPointerException.
    if not isinstance(settings.initial_position, datetime) and any(
        lease.checkpoint == "AT_TIMESTAMP" for lease in read_leases(dynamodb, table)
    ):
        yield "leases are rewound (AT_TIMESTAMP): start with --from TIME, the time given to `orders-cdc rewind`"


def _downstream(settings: Settings, session: boto3.session.Session) -> Iterator[str]:
    """Every table, queue, delivery stream and bucket the handlers write to: a missing one
    would hold its route at every batch."""
    r = settings.resources

    def client(service: str):
        return session.client(service, endpoint_url=settings.endpoint(service), config=_QUICK)

    ddb, sqs = client("dynamodb"), client("sqs")
    # The replica's own region and endpoint, as Clients.replica reaches it.
    replica_endpoint = settings.replica_endpoint or settings.endpoint("dynamodb")
    replica = session.client("dynamodb", region_name=settings.replica_region, endpoint_url=replica_endpoint, config=_QUICK)
    replica_at = f"in {settings.replica_region or settings.region}" + (f" at {replica_endpoint}" if replica_endpoint else "")
    probes: list[tuple[str, Callable[[], object]]] = [
        *((f"table {t!r}", lambda t=t: ddb.describe_table(TableName=t)) for t in (
            r.idempotency_table, r.inventory_table, r.product_orders_table, r.order_metrics_table,
            r.product_metrics_table)),
        *((f"queue {q!r}", lambda q=q: sqs.get_queue_url(QueueName=q)) for q in (r.dlq_queue, r.refund_queue)),
        (f"delivery stream {r.firehose_stream!r}",
         lambda: client("firehose").describe_delivery_stream(DeliveryStreamName=r.firehose_stream)),
        (f"bucket {r.dead_letter_bucket!r}", lambda: client("s3").head_bucket(Bucket=r.dead_letter_bucket)),
        (f"replica table {r.replica_table!r} ({replica_at})", lambda: replica.describe_table(TableName=r.replica_table)),
    ]
    for what, probe in probes:
        try:
            probe()
        except EndpointConnectionError as exc:
            yield f"{what}: cannot reach {exc.kwargs.get('endpoint_url', 'its endpoint')}"
        except ClientError as exc:
            if classify(exc) is Failure.TRANSIENT:
                continue  # a blip of the service, not a setting: the handlers retry it
            code = error_code(exc)
            missing = code in ("ResourceNotFoundException", "AWS.SimpleQueueService.NonExistentQueue",
                               "QueueDoesNotExist", "404", "NoSuchBucket")
            yield f"{what} {'does not exist' if missing else f'refused: {code}'}"
