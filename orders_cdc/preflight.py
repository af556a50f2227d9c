"""Checks before the JVM starts, so a wrong stream or endpoint is one clear line, not a
wall of Java stack traces a minute later."""

from __future__ import annotations

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from orders_cdc.errors import SettingsError, error_code
from orders_cdc.settings import Settings

_QUICK = Config(retries={"mode": "standard", "max_attempts": 2}, connect_timeout=3, read_timeout=5)


def preflight(settings: Settings, stream_name: str, lease_table: str) -> None:
    session = boto3.session.Session(region_name=settings.region)
    kinesis = session.client("kinesis", endpoint_url=settings.endpoint("kinesis"), config=_QUICK)
    dynamodb = session.client("dynamodb", endpoint_url=settings.endpoint("dynamodb"), config=_QUICK)
    where = settings.endpoint("kinesis") or f"Kinesis in {settings.region}"
    try:
        summary = kinesis.describe_stream_summary(StreamName=stream_name)["StreamDescriptionSummary"]
    except NoCredentialsError:
        raise SettingsError("no AWS credentials found (environment, profile or task role)") from None
    except EndpointConnectionError:
        raise SettingsError(f"cannot reach Kinesis at {where}") from None
    except ClientError as exc:
        code = error_code(exc)
        if code == "ResourceNotFoundException":
            raise SettingsError(f"stream {stream_name!r} not found at {where}") from None
        raise SettingsError(f"Kinesis at {where} refused DescribeStreamSummary: {code}") from None
    if summary["StreamStatus"] not in ("ACTIVE", "UPDATING"):
        raise SettingsError(f"stream {stream_name!r} is {summary['StreamStatus']}, not ACTIVE")
    retention = int(summary.get("RetentionPeriodHours") or 24) * 3600
    if settings.idempotency_ttl_seconds < retention:
        # A change redelivered (or replayed) after its done-marker expired is done again:
        # a second email, inventory counted twice.
        raise SettingsError(
            f"ORDERS_CDC_IDEMPOTENCY_TTL_SECONDS={settings.idempotency_ttl_seconds} is shorter than the stream's"
            f" retention ({retention} s): redelivered changes would be done twice"
        )
    where = settings.endpoint("dynamodb") or f"DynamoDB in {settings.region}"
    try:
        dynamodb.describe_table(TableName=lease_table)
    except EndpointConnectionError:
        raise SettingsError(f"cannot reach DynamoDB (lease table) at {where}") from None
    except ClientError as exc:
        code = error_code(exc)
        if code != "ResourceNotFoundException":  # the daemon creates its lease table
            raise SettingsError(f"DynamoDB at {where} refused DescribeTable: {code}") from None
        return
    from datetime import datetime

    from orders_cdc.leases import read_leases

    # After `orders-cdc replay`, the daemon opens AT_TIMESTAMP leases at its configured
    # timestamp; without one it loops on a NullPointerException.
    if not isinstance(settings.initial_position, datetime) and any(
        lease.checkpoint == "AT_TIMESTAMP" for lease in read_leases(dynamodb, lease_table)
    ):
        raise SettingsError("leases are set to replay (AT_TIMESTAMP): start with --from TIME (the replay time)")
