"""Wiring: settings -> clients -> routes -> pipeline -> processor. Built once per process."""

from __future__ import annotations


from collections.abc import Collection
from dataclasses import dataclass
from functools import cached_property

import boto3
from botocore.config import Config

from orders_cdc.breaker import BreakerPolicy
from orders_cdc.checkpointing import CheckpointPolicy
from orders_cdc.concurrency import CallPool
from orders_cdc.consumer import ChangeProcessor
from orders_cdc.deadletter import SqsDeadLetterSink
from orders_cdc.errors import SettingsError
from orders_cdc.idempotency.dynamodb import DynamoDbIdempotencyStore
from orders_cdc.pipeline import Pipeline
from orders_cdc.ratelimit import TokenBucket
from orders_cdc.retry import RetryPolicy
from orders_cdc.routing import Router
from orders_cdc.settings import Settings

# Handlers retry at the record level with their own policy; keep the SDK's retries short
# so a dead downstream surfaces quickly instead of hiding inside one call. DynamoDB answers
# in milliseconds: seconds, not botocore's 60, before a call counts as hung.
_TIMEOUTS = {"dynamodb": {"connect_timeout": 2, "read_timeout": 5}}
_DEFAULT_TIMEOUTS = {"connect_timeout": 3, "read_timeout": 15}
# SendEmail and SendMessageBatch are not idempotent: a reply that timed out says nothing of
# whether the email or the refund went, and botocore's own retry of such a call sends it
# again (a fault scenario saw 4 copies of each email behind a 30 s stall; the 600 s soak,
# 3 of a refund batch behind a 25 s one). So these clients make one attempt and wait for a
# reply past the handler's deadline: the pipeline's deadline decides (concurrency.py), whose
# abandoned call, when it ends, still writes its done-marker, so its retry sends nothing.
_SENDS = ("ses", "sqs")
_SEND_READ_MARGIN = 5.0  # seconds past ORDERS_CDC_HANDLER_TIMEOUT_SECONDS


class Clients:
    """boto3 clients for the handlers, honouring AWS_ENDPOINT_URL[_<SERVICE>]."""

    def __init__(self, settings: Settings, session: boto3.session.Session | None = None):
        self._settings = settings
        self._session = session or boto3.session.Session(region_name=settings.region)
        self._queue_urls: dict[str, str] = {}

    def _client(self, service: str, region: str | None = None, endpoint_url: str | None = None):
        # One pooled connection per call in flight: botocore's default pool (10) would open
        # and throw away a connection, with its handshakes, for every call past the tenth.
        # No client-side parameter validation: our requests are built by code, and walking a
        # 100-item transaction or a 500-record batch against the model cost ~10% of the
        # child's CPU in B5's profile; AWS validates them anyway (ValidationException).
        timeouts = _TIMEOUTS.get(service, _DEFAULT_TIMEOUTS)
        if service in _SENDS:
            timeouts = {**timeouts, "read_timeout": self._settings.handler_timeout_seconds + _SEND_READ_MARGIN}
        # total_max_attempts counts the first attempt (botocore's "max_attempts" counts retries only).
        config = Config(retries={"mode": "standard", "total_max_attempts": 1 if service in _SENDS else 3},
                        max_pool_connections=self._settings.max_in_flight,
                        parameter_validation=False, **timeouts)
        return self._session.client(service, region_name=region, endpoint_url=endpoint_url or self._settings.endpoint(service),
                                    config=config)

    # cached_property: created on first use, once; a handler that is never routed to
    # costs nothing at start-up.
    @cached_property
    def dynamodb(self):
        return self._client("dynamodb")

    @cached_property
    def replica(self):
        """DynamoDB where the replica table is (replication.orders_replica): its own region and
        endpoint, the same timeouts, retries and pool as the other DynamoDB client."""
        return self._client("dynamodb", region=self._settings.replica_region,
                            endpoint_url=self._settings.replica_endpoint)

    @cached_property
    def sqs(self):
        return self._client("sqs")

    @cached_property
    def ses(self):
        return self._client("ses")

    @cached_property
    def firehose(self):
        return self._client("firehose")

    @cached_property
    def s3(self):
        return self._client("s3")

    @cached_property
    def kinesis(self):
        return self._client("kinesis")

    def queue_url(self, name: str) -> str:
        if name not in self._queue_urls:
            self._queue_urls[name] = self.sqs.get_queue_url(QueueName=name)["QueueUrl"]
        return self._queue_urls[name]


@dataclass(frozen=True)
class Context:
    """What handlers get besides the changes."""

    settings: Settings
    clients: Clients
    ses_rate: TokenBucket | None = None  # this worker's share of the account's SES sending quota


def build_pipeline(settings: Settings, clients: Clients, routes: Collection[str] | None = None,
                   key_namespace: str = "") -> Pipeline:
    """The record path, shared by the daemon's children, `orders-cdc dlq redrive` and
    `orders-cdc replay` (which may keep only some `routes`, by name; see `route_names`)."""
    from processors import all_routes

    chosen = all_routes(settings.resources, replica_ttl_deletes=settings.replica_ttl_deletes)
    if routes is not None:
        unknown = set(routes) - {r.name for r in chosen}
        if unknown:
            raise SettingsError(f"unknown route(s) {', '.join(sorted(unknown))}; the routes are: "
                                f"{', '.join(route_names(settings))}")
        chosen = [r for r in chosen if r.name in routes]
    rate = settings.ses_max_send_rate
    ctx = Context(settings, clients, TokenBucket(rate, burst=rate) if rate else None)
    table = settings.resources.idempotency_table
    return Pipeline(
        router=Router(chosen),
        ctx=ctx,
        dead_letters=SqsDeadLetterSink(clients.sqs, clients.queue_url(settings.resources.dlq_queue), clients.s3,
                                       settings.resources.dead_letter_bucket),
        retry=RetryPolicy(
            max_attempts=settings.max_attempts,
            base_seconds=settings.retry_base_seconds,
            max_seconds=settings.retry_max_seconds,
            max_record_age_seconds=settings.max_record_age_seconds,
        ),
        idempotency=DynamoDbIdempotencyStore(clients.dynamodb, table, ttl_seconds=settings.idempotency_ttl_seconds,
                                             lock_seconds=settings.idempotency_lock_seconds),
        breaker=BreakerPolicy(settings.breaker_threshold, settings.breaker_open_seconds, settings.breaker_max_open_seconds),
        pool=CallPool(capacity=settings.max_in_flight),
        handler_timeout_seconds=settings.handler_timeout_seconds,
        batch_deadline_seconds=settings.batch_deadline_seconds,
        key_namespace=key_namespace,
    )


def route_names(settings: Settings) -> list[str]:
    from processors import all_routes

    return [r.name for r in all_routes(settings.resources, replica_ttl_deletes=settings.replica_ttl_deletes)]


# The cyclic GC, tuned for a batch processor. A batch is ~100 container objects per record,
# all alive until the batch ends and freed by reference counting, not by the collector: with
# CPython's default thresholds (700, 10, 10) the collector walks the growing batch again and
# again (B1's route-only profile: 40% of the child's CPU outside the handlers). After
# start-up, freeze() moves the long-lived objects (modules, clients, routes) out of its way,
# and the thresholds make it run ~70x less often. It still runs: cycles are still collected.
GC_THRESHOLDS = (50_000, 20, 10)


def tune_gc() -> None:
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def build_processor(settings: Settings, clients: Clients | None = None) -> ChangeProcessor:
    from orders_cdc.health import Heartbeat

    return ChangeProcessor(
        build_pipeline(settings, clients or Clients(settings)),
        lambda: CheckpointPolicy(settings.checkpoint_every_records, settings.checkpoint_every_seconds),
        heartbeat=Heartbeat(settings.health.heartbeat_file).touch,
    )
