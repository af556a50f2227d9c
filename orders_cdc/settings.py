"""Settings: read once from the environment into a frozen object.

Every setting has a documented default (README, "Configuration"). A bad value raises
SettingsError with one line naming the variable, the value and what is allowed; the
entry points print that line and exit 2 before anything starts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from orders_cdc.errors import SettingsError
from orders_cdc.health import DEFAULT_FILE as DEFAULT_HEARTBEAT_FILE, HealthSettings

PREFIX = "ORDERS_CDC_"


@dataclass(frozen=True, slots=True)
class Resources:
    """Names of the downstream resources the handlers write to."""

    orders_table: str = "Orders"
    dlq_queue: str = "orders-cdc-dlq"
    dead_letter_bucket: str = "orders-cdc-dead-letters"  # dead letters too big for a message
    refund_queue: str = "orders-cdc-refunds"
    inventory_table: str = "Inventory"
    product_orders_table: str = "ProductOrders"
    order_metrics_table: str = "OrderMetrics"
    product_metrics_table: str = "ProductMetrics"
    idempotency_table: str = "Idempotency"
    firehose_stream: str = "orders-cdc-analytics"
    sender_email: str = "orders@example.com"
    # The current-state copy of the orders (replication.orders_replica): a table name, or a
    # table ARN for a table in another account (its resource-based policy grants the writes).
    replica_table: str = "OrdersReplica"

    def environment(self) -> dict[str, str]:
        """The ORDERS_CDC_* variables that `load` reads these names back from."""
        return {PREFIX + name.upper(): getattr(self, name) for name in Resources.__dataclass_fields__}


@dataclass(frozen=True, slots=True)
class Settings:
    region: str
    # None: keep app.properties' value. Set: the environment wins.
    stream_name: str | None = None
    application_name: str | None = None
    worker_id: str | None = None
    # None keeps app.properties' maxLeasesForWorker (unset: no limit). ECS sets it from the
    # task's size, so that a task never takes more shards than its memory holds children.
    max_leases_for_worker: int | None = None
    # None keeps app.properties' value; otherwise TRIM_HORIZON, LATEST or a UTC datetime.
    initial_position: str | datetime | None = None
    endpoints: Mapping[str, str] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    log_level: str = "INFO"
    checkpoint_every_records: int = 1000
    checkpoint_every_seconds: float = 5.0
    max_attempts: int = 5
    retry_base_seconds: float = 0.2
    retry_max_seconds: float = 5.0
    max_record_age_seconds: float = 0.0  # 0 = no age limit
    # Idempotency records (table resources.idempotency_table): kept this long after a
    # reaction (DynamoDB TTL on expires_at); longer than the stream's retention, so a
    # replay is still recognised.
    idempotency_ttl_seconds: int = 7 * 24 * 3600
    # An INPROGRESS lock's lease: after a crash the change waits this long. Must exceed
    # the handler timeout, or a slow reaction could lose its lock to a second worker.
    idempotency_lock_seconds: float = 90.0
    handler_timeout_seconds: float = 60.0  # one handler call; a hung call is a retryable failure
    # One processRecords call at most this long (daemon timeoutInSeconds: 300), else the
    # child exits unacknowledged and the shard restarts from its checkpoint.
    batch_deadline_seconds: float = 240.0
    breaker_threshold: int = 5  # distinct records failing in a row that open a route's circuit
    breaker_open_seconds: float = 1.0  # first open period; doubles per failed probe
    breaker_max_open_seconds: float = 30.0
    # Handler calls in flight at once per child (one child per shard); also the size of each
    # boto3 client's connection pool.
    max_in_flight: int = 64
    # SES sends per second this worker may use (the account's quota shared among workers);
    # 0: no limit here (throttling from SES still only slows the shard down).
    ses_max_send_rate: float = 0.0
    # The worker's heartbeat (health.py): its file, and the age past which it is unhealthy.
    health: HealthSettings = field(default_factory=HealthSettings)
    # The replica table's client (replication.orders_replica): its own region (None: the
    # app's) and endpoint (None: the standard AWS_ENDPOINT_URL_DYNAMODB / AWS_ENDPOINT_URL),
    # so the copy can sit in another region, account or emulator.
    replica_region: str | None = None
    replica_endpoint: str | None = None
    # Whether TTL expiries (REMOVEs by the DynamoDB service) delete the copy too.
    replica_ttl_deletes: bool = True

    def endpoint(self, service: str) -> str | None:
        return self.endpoints.get(service) or self.endpoints.get("")


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_SERVICES = ("kinesis", "dynamodb", "dynamodbstreams", "cloudwatch", "sqs", "ses", "firehose", "s3")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_TABLE_NAME = re.compile(r"^[A-Za-z0-9_.-]{3,255}$")
_TABLE_ARN = re.compile(r"^arn:aws[a-z-]*:dynamodb:(?P<region>[a-z0-9-]+):\d{12}:table/(?P<name>[A-Za-z0-9_.-]{3,255})$")
_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d{1,2}$")
_URL = re.compile(r"^https?://[^\s/]+")
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(PREFIX + name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{PREFIX}{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise SettingsError(f"{PREFIX}{name}={raw!r} must be >= {minimum}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    raw = env.get(PREFIX + name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{PREFIX}{name}={raw!r} is not a number") from None
    if not value >= minimum:
        raise SettingsError(f"{PREFIX}{name}={raw!r} must be >= {minimum}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(PREFIX + name)
    if raw is None or raw == "":
        return default
    if raw.strip().lower() in _TRUE:
        return True
    if raw.strip().lower() in _FALSE:
        return False
    raise SettingsError(f"{PREFIX}{name}={raw!r} is not a boolean (true or false)")


def parse_position(raw: str, name: str = PREFIX + "INITIAL_POSITION") -> str | datetime:
    """TRIM_HORIZON, LATEST, or an ISO-8601 time / epoch seconds for AT_TIMESTAMP."""
    upper = raw.strip().upper()
    if upper in ("TRIM_HORIZON", "LATEST"):
        return upper
    text = raw.strip()
    if text.upper().startswith("AT_TIMESTAMP:"):
        text = text.split(":", 1)[1]
    try:
        if re.fullmatch(r"\d+(\.\d+)?", text):
            return datetime.fromtimestamp(float(text), tz=timezone.utc)
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise SettingsError(
            f"{name}={raw!r}: expected TRIM_HORIZON, LATEST, an ISO-8601 time or epoch seconds"
        ) from None
    if when.tzinfo is None:
        raise SettingsError(f"{name}={raw!r}: give a timezone (e.g. 2026-11-28T10:00:00Z)")
    return when.astimezone(timezone.utc)


def _endpoints(env: Mapping[str, str]) -> dict[str, str]:
    """The standard AWS variables: AWS_ENDPOINT_URL and AWS_ENDPOINT_URL_<SERVICE>."""
    found: dict[str, str] = {}
    generic = env.get("AWS_ENDPOINT_URL")
    if generic:
        found[""] = generic
    for service in _SERVICES:
        value = env.get("AWS_ENDPOINT_URL_" + service.upper())
        if value:
            found[service] = value
    for key, value in found.items():
        if not _URL.match(value):
            var = "AWS_ENDPOINT_URL" + ("_" + key.upper() if key else "")
            raise SettingsError(f"{var}={value!r} is not an http(s) URL")
    return found


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _no_control_characters(env: Mapping[str, str]) -> None:
    """Values go into the daemon's properties file, one per line: a newline in one would
    add a line (a setting) of its own."""
    for name, value in env.items():
        if (name.startswith(PREFIX) or name.startswith("AWS_ENDPOINT_URL") or name in ("AWS_REGION", "AWS_DEFAULT_REGION")) \
                and _CONTROL.search(value):
            raise SettingsError(f"{name} contains a control character (newline, tab, ...): {value[:40]!r}")


def load(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    _no_control_characters(env)
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if not region:
        raise SettingsError("AWS_REGION is not set (e.g. AWS_REGION=us-east-1)")
    stream = env.get(PREFIX + "STREAM") or None
    if stream and not _NAME.match(stream):
        raise SettingsError(f"{PREFIX}STREAM={stream!r} is not a valid stream name")
    app = env.get(PREFIX + "APPLICATION") or None
    if app and not _NAME.match(app):
        raise SettingsError(f"{PREFIX}APPLICATION={app!r} is not a valid application name")
    level = env.get(PREFIX + "LOG_LEVEL", "INFO").upper()
    if level not in _LOG_LEVELS:
        raise SettingsError(f"{PREFIX}LOG_LEVEL={level!r}: expected one of {', '.join(_LOG_LEVELS)}")
    position_raw = env.get(PREFIX + "INITIAL_POSITION")
    position = parse_position(position_raw) if position_raw else None
    endpoints = _endpoints(env)
    defaults = Resources()
    resources = Resources(
        **{
            name: env.get(PREFIX + name.upper(), getattr(defaults, name))
            for name in Resources.__dataclass_fields__
        }
    )
    return Settings(
        region=region,
        stream_name=stream,
        application_name=app,
        worker_id=env.get(PREFIX + "WORKER_ID") or None,
        max_leases_for_worker=_int(env, "MAX_LEASES_FOR_WORKER", 0, minimum=1) or None,
        initial_position=position,
        endpoints=endpoints,
        resources=resources,
        log_level=level,
        checkpoint_every_records=_int(env, "CHECKPOINT_EVERY_RECORDS", 1000, minimum=1),
        checkpoint_every_seconds=_float(env, "CHECKPOINT_EVERY_SECONDS", 5.0),
        max_attempts=_int(env, "MAX_ATTEMPTS", 5, minimum=1),
        retry_base_seconds=_float(env, "RETRY_BASE_SECONDS", 0.2),
        retry_max_seconds=_float(env, "RETRY_MAX_SECONDS", 5.0),
        max_record_age_seconds=_float(env, "MAX_RECORD_AGE_SECONDS", 0.0),
        **_reliability(env),
        health=load_health(env),
        **_replica(env, region, resources, endpoints),
    )


def load_health(env: Mapping[str, str] | None = None) -> HealthSettings:
    """The heartbeat settings alone: `orders-cdc health` needs nothing else (no region)."""
    env = os.environ if env is None else env
    path = env.get(PREFIX + "HEARTBEAT_FILE") or DEFAULT_HEARTBEAT_FILE
    stale = _float(env, "HEARTBEAT_STALE_SECONDS", 120.0, minimum=1.0)
    interval = _float(env, "HEARTBEAT_INTERVAL_SECONDS", 10.0, minimum=0.1)
    if interval * 2 > stale:
        raise SettingsError(
            f"{PREFIX}HEARTBEAT_STALE_SECONDS={stale:g} must be at least twice {PREFIX}HEARTBEAT_INTERVAL_SECONDS={interval:g}"
        )
    return HealthSettings(heartbeat_file=Path(path), stale_seconds=stale, interval_seconds=interval)


def _replica(env: Mapping[str, str], region: str, resources: Resources, endpoints: Mapping[str, str]) -> dict:
    """The replica table's name (or ARN), region and endpoint, checked together."""
    table = resources.replica_table
    arn = _TABLE_ARN.match(table)
    if not arn and not _TABLE_NAME.match(table):
        raise SettingsError(f"{PREFIX}REPLICA_TABLE={table!r} is not a DynamoDB table name or table ARN")
    replica_region = env.get(PREFIX + "REPLICA_REGION") or None
    if replica_region is not None and not _REGION.match(replica_region):
        raise SettingsError(f"{PREFIX}REPLICA_REGION={replica_region!r} is not an AWS region (e.g. eu-west-1)")
    if arn and replica_region and arn["region"] != replica_region:
        raise SettingsError(f"{PREFIX}REPLICA_TABLE={table!r} is in {arn['region']}, not"
                            f" {PREFIX}REPLICA_REGION={replica_region!r}")
    replica_region = replica_region or (arn["region"] if arn else None)
    endpoint = env.get(PREFIX + "REPLICA_ENDPOINT") or None
    if endpoint is not None and not _URL.match(endpoint):
        raise SettingsError(f"{PREFIX}REPLICA_ENDPOINT={endpoint!r} is not an http(s) URL")
    same_endpoint = (endpoint or endpoints.get("dynamodb") or endpoints.get("")) == (
        endpoints.get("dynamodb") or endpoints.get(""))
    if not arn and table == resources.orders_table and (replica_region or region) == region and same_endpoint:
        # The copy's writes would be changes of the orders table: each one replicated again.
        raise SettingsError(f"{PREFIX}REPLICA_TABLE={table!r} is the orders table itself (same region and endpoint)")
    return {
        "replica_region": replica_region,
        "replica_endpoint": endpoint,
        "replica_ttl_deletes": _bool(env, "REPLICA_TTL_DELETES", True),
    }


def _reliability(env: Mapping[str, str]) -> dict[str, float | int]:
    values = {
        "idempotency_ttl_seconds": _int(env, "IDEMPOTENCY_TTL_SECONDS", 7 * 24 * 3600, minimum=60),
        "idempotency_lock_seconds": _float(env, "IDEMPOTENCY_LOCK_SECONDS", 90.0, minimum=1.0),
        "handler_timeout_seconds": _float(env, "HANDLER_TIMEOUT_SECONDS", 60.0, minimum=0.1),
        "batch_deadline_seconds": _float(env, "BATCH_DEADLINE_SECONDS", 240.0, minimum=1.0),
        "breaker_threshold": _int(env, "BREAKER_THRESHOLD", 5, minimum=1),
        "breaker_open_seconds": _float(env, "BREAKER_OPEN_SECONDS", 1.0, minimum=0.01),
        "breaker_max_open_seconds": _float(env, "BREAKER_MAX_OPEN_SECONDS", 30.0, minimum=0.01),
        "max_in_flight": _int(env, "MAX_IN_FLIGHT", 64, minimum=1),
        "ses_max_send_rate": _float(env, "SES_MAX_SEND_RATE", 0.0),
    }
    if values["idempotency_lock_seconds"] <= values["handler_timeout_seconds"]:
        raise SettingsError(
            f"{PREFIX}IDEMPOTENCY_LOCK_SECONDS={values['idempotency_lock_seconds']:g} must exceed"
            f" {PREFIX}HANDLER_TIMEOUT_SECONDS={values['handler_timeout_seconds']:g}"
        )
    if values["batch_deadline_seconds"] <= values["handler_timeout_seconds"]:
        raise SettingsError(
            f"{PREFIX}BATCH_DEADLINE_SECONDS={values['batch_deadline_seconds']:g} must exceed"
            f" {PREFIX}HANDLER_TIMEOUT_SECONDS={values['handler_timeout_seconds']:g}"
        )
    return values
