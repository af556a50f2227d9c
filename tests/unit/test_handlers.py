"""The order handlers against a real moto server: what each one writes, read back from
moto (SES messages, SQS queue, DynamoDB tables, Firehose output in S3)."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from decimal import Decimal
from itertools import count
from typing import Any

import boto3
import orjson
import pytest
import requests
from botocore.exceptions import ClientError

from orders_cdc.app import Clients, Context
from orders_cdc.change import ChangeRecord, Position, decode_kinesis_data
from orders_cdc.deadletter import InMemoryDeadLetterSink
from orders_cdc.errors import PartialBatchFailure, PermanentError, RetryableError, is_retryable
from orders_cdc.idempotency import reaction_key
from orders_cdc.idempotency.dynamodb import DynamoDbIdempotencyStore
from orders_cdc.idempotency.guard import CallResult, IdempotencyGuard
from orders_cdc.local.resources import LocalClients, ResourceNames, create_resources
from orders_cdc.pipeline import Outcome, Pipeline, call_handler
from orders_cdc.retry import RetryPolicy
from orders_cdc.routing import Router
from orders_cdc.settings import load
from processors import _firehose, all_routes, analytics, audit, inventory, metrics, notification, refunds, views
from processors._order import OrderDataError
from tests.factories import kcl_record, kds_record, sequence_number

# ---------------------------------------------------------------------------------------------
# Order schema builders (orders_cdc/local/orders.py)

CREATED_AT = "2024-07-15T10:00:00+00:00"
DAY = "2024-07-15"
_us = count(1_721_037_600_000_000)  # strictly increasing change times


def order(order_id: str, status: str = "pending", items=(("p-1", "Kettle", 2, "39.90"),), *,
          email: str | None = "ann@example.com", created_at: str | None = CREATED_AT, **extra: Any) -> dict:
    lines = [{"product_id": p, "name": n, "quantity": Decimal(q), "unit_price": Decimal(price)} for p, n, q, price in items]
    item = {
        "order_id": order_id,
        "customer_id": "c-0001",
        "status": status,
        "items": lines,
        "total": sum((line["quantity"] * line["unit_price"] for line in lines), Decimal("0.00")),
        "currency": "USD",
        "updated_at": "2024-07-15T10:00:00+00:00",
    }
    if email is not None:
        item["customer_email"] = email
    if created_at is not None:
        item["created_at"] = created_at
    item.update(extra)
    return item


def doc(event: str, new: dict | None = None, old: dict | None = None, *, table: str = "Orders",
        created_us: int | None = None, ttl: bool = False) -> dict:
    order_id = (new or old)["order_id"]
    return kds_record(event, new=new, old=old, keys={"order_id": order_id}, table=table,
                      created_us=created_us if created_us is not None else next(_us), ttl=ttl)


def change(event: str, new: dict | None = None, old: dict | None = None, *, position: Position | None = None,
           **kw: Any) -> ChangeRecord:
    return decode_kinesis_data(orjson.dumps(doc(event, new, old, **kw)), position)


def insert(new, **kw):
    return change("INSERT", new, None, **kw)


def modify(old, **changes_and_kw):
    kw = {k: changes_and_kw.pop(k) for k in ("table", "created_us", "position") if k in changes_and_kw}
    return change("MODIFY", {**old, **changes_and_kw}, old, **kw)


def remove(old, **kw):
    return change("REMOVE", None, old, **kw)


# ---------------------------------------------------------------------------------------------
# A fresh set of resources on the shared moto server, and the handlers' context


class Stack:
    def __init__(self, endpoint: str):
        s = uuid.uuid4().hex[:8]
        self.endpoint = endpoint
        self.names = ResourceNames.unique(s, shards=1)
        self.aws = LocalClients.from_endpoints({name: endpoint for name in LocalClients.__dataclass_fields__})
        self.created = create_resources(self.aws, self.names)
        self.settings = load({
            "AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", **self.names.environment(),
        })
        # Explicit dummy credentials: the process environment may have none (or real ones).
        session = boto3.session.Session(aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1")
        self.ctx = Context(self.settings, Clients(self.settings, session))
        self.calls: Counter = Counter()
        for service in ("dynamodb", "sqs", "ses", "firehose"):
            getattr(self.ctx.clients, service).meta.events.register(
                f"before-call.{service}", lambda model, **_: self.calls.update([model.name]))

    # --- read back what the handlers did

    def emails(self, to: str) -> list[dict]:
        data = requests.get(f"{self.endpoint}/moto-api/data.json", timeout=10).json()
        return [
            {"from": m["source"], "to": m["destinations"]["ToAddresses"], "subject": m["subject"], "body": m["body"]}
            for m in data.get("ses", {}).get("Message", []) if to in m["destinations"].get("ToAddresses", [])
        ]

    def refund_messages(self) -> list[dict]:
        url, found = self.created.queue_urls[self.names.refund_queue], []
        while batch := self.aws.sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", []):
            found += [json.loads(m["Body"]) for m in batch]
        return found

    def rows(self, table: str) -> list[dict]:
        from boto3.dynamodb.types import TypeDeserializer

        d = TypeDeserializer()
        items = self.aws.dynamodb.scan(TableName=table, ConsistentRead=True)["Items"]
        return [{k: d.deserialize(v) for k, v in item.items()} for item in items]

    def inventory(self) -> dict[str, dict]:
        return {r.pop("product_id"): r for r in self.rows(self.names.inventory_table)}

    def order_metrics(self) -> dict[str, dict]:
        return {r.pop("day"): r for r in self.rows(self.names.order_metrics_table)}

    def product_metrics(self) -> dict[tuple[str, str], dict]:
        return {(r.pop("product_id"), r.pop("day")): r for r in self.rows(self.names.product_metrics_table)}

    def view(self) -> dict[tuple[str, str], dict]:
        return {(r.pop("product_id"), r.pop("order_id")): r for r in self.rows(self.names.product_orders_table)}

    def firehose_lines(self) -> list[dict]:
        s3, bucket, out = self.aws.s3, self.names.analytics_bucket, []
        for obj in sorted(s3.list_objects_v2(Bucket=bucket).get("Contents", []), key=lambda o: o["Key"]):
            body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            out += [json.loads(line, parse_float=Decimal) for line in body.splitlines() if line.strip()]
        return out

    def apply(self, route_name: str, changes: list[ChangeRecord]) -> CallResult:
        """One call of an ATOMIC route, committed the way the pipeline does (guard + the
        DynamoDB idempotency store): its counter updates with their done-markers."""
        route = next(r for r in all_routes(self.settings.resources) if r.name == route_name)
        store = DynamoDbIdempotencyStore(self.ctx.clients.dynamodb, self.names.idempotency_table)
        keys = [reaction_key(route.name, c) for c in changes]
        return IdempotencyGuard(store).atomic(changes, keys, lambda cs: call_handler(route, cs, self.ctx))

    def pipeline(self) -> tuple[Pipeline, InMemoryDeadLetterSink]:
        dlq = InMemoryDeadLetterSink()
        store = DynamoDbIdempotencyStore(self.ctx.clients.dynamodb, self.names.idempotency_table)
        return Pipeline(router=Router(all_routes(self.settings.resources)), ctx=self.ctx, dead_letters=dlq,
                        retry=RetryPolicy(max_attempts=2, base_seconds=0, max_seconds=0), sleep=lambda s: None,
                        idempotency=store), dlq


@pytest.fixture
def stack(moto_server) -> Stack:
    return Stack(moto_server)


class Faulty:
    """A real client with one method's reply rewritten (or replaced by an exception)."""

    def __init__(self, client, method: str, rewrite):
        self._client, self._method, self._rewrite = client, method, rewrite
        self.calls = 0

    def __getattr__(self, name):
        if name != self._method:
            return getattr(self._client, name)

        def call(**kwargs):
            self.calls += 1
            return self._rewrite(self.calls, kwargs, getattr(self._client, name))

        return call


def inject(stack: Stack, service: str, method: str, rewrite) -> Faulty:
    faulty = Faulty(getattr(stack.ctx.clients, service), method, rewrite)
    stack.ctx.clients.__dict__[service] = faulty  # cached_property: the instance dict wins
    return faulty


# ---------------------------------------------------------------------------------------------
# Routes

BASE = {"analytics.firehose_copy", "audit.firehose_audit", "views.product_orders", "metrics.aggregates",
        "replication.orders_replica"}
o = order("o-1")


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (lambda: insert(o), BASE),
        (lambda: modify(o, status="processing"), BASE),
        (lambda: modify({**o, "status": "processing"}, status="shipped", tracking_number="1Z1"),
         BASE | {"inventory.shipped", "notification.shipped_email"}),
        (lambda: insert({**o, "status": "shipped"}), BASE | {"inventory.shipped", "notification.shipped_email"}),
        # a re-save of a shipped order is no transition: no second email, no second stock move
        (lambda: modify({**o, "status": "shipped"}, updated_at="2024-07-16T00:00:00+00:00"), BASE),
        (lambda: modify({**o, "status": "shipped"}, status="delivered"),
         BASE | {"notification.delivered_email", "notification.review_request"}),
        (lambda: modify(o, status="cancelled", cancel_reason="changed mind"),
         BASE | {"inventory.cancelled", "refunds.request"}),
        (lambda: modify({**o, "status": "cancelled"}, cancel_reason="typo fixed"), BASE),
        (lambda: remove(o), BASE),
        (lambda: remove(o, ttl=True), BASE - {"metrics.aggregates"}),  # an expired order stays counted
        (lambda: insert(o, table="Other"), set()),
    ],
    ids=["insert", "processing", "shipped", "created-shipped", "shipped-resave", "delivered", "cancelled",
         "cancelled-resave", "remove", "ttl-remove", "other-table"],
)
def test_route_matching(record, expected):
    router = Router(all_routes(load({"AWS_REGION": "us-east-1"}).resources))
    assert {r.name for r in router.match(record())} == expected


def test_a_ttl_expiry_reaches_the_replica_only_when_ttl_deletes_are_replicated():
    resources = load({"AWS_REGION": "us-east-1"}).resources
    expired = remove(o, ttl=True)
    on = {r.name for r in Router(all_routes(resources)).match(expired)}
    off = {r.name for r in Router(all_routes(resources, replica_ttl_deletes=False)).match(expired)}
    assert on - off == {"replication.orders_replica"} and "replication.orders_replica" not in off
    # an application REMOVE is replicated either way
    assert "replication.orders_replica" in {r.name for r in Router(all_routes(resources, replica_ttl_deletes=False)).match(remove(o))}


def test_every_module_contributes_routes_with_unique_names():
    names = [r.name for r in all_routes(load({"AWS_REGION": "us-east-1"}).resources)]
    assert len(names) == len(set(names)) == 11
    assert {n.split(".")[0] for n in names} == {"analytics", "audit", "views", "metrics", "inventory", "refunds", "notification",
                                                "replication"}


# ---------------------------------------------------------------------------------------------
# Notifications (SES)


def test_shipped_email_has_the_tracking_number(stack):
    to = f"ann-{uuid.uuid4().hex[:6]}@example.com"
    before = order("o-100", "processing", items=(("p-1", "Kettle", 2, "39.90"), ("p-2", "Mug", 1, "8.99")), email=to)
    notification.send_shipped(modify(before, status="shipped", tracking_number="1Z0000000042"), stack.ctx)
    assert stack.emails(to) == [{
        "from": stack.names.sender_email,
        "to": [to],
        "subject": "Your order o-100 has shipped",
        "body": "Hello,\n\nGood news: your order o-100 is on its way.\n\nTracking number: 1Z0000000042\n\n"
                "Items:\n  2 x Kettle\n  1 x Mug\n\nTotal: 88.79 USD\n\nThank you for your order.\n",
    }]
    assert stack.calls["SendEmail"] == 1


def test_delivered_sends_a_confirmation_and_a_review_request(stack):
    to = f"bob-{uuid.uuid4().hex[:6]}@example.com"
    before = order("o-101", "shipped", items=(("p-1", "Kettle", 1, "39.90"), ("p-2", "Mug", 3, "8.99")), email=to,
                   tracking_number="1Z9")
    pipeline, dlq = stack.pipeline()
    results = pipeline.process([kcl_record(doc("MODIFY", {**before, "status": "delivered"}, before,
                                               table=stack.names.orders_table), sequence_number(1))], "shard-0")
    assert [r.outcome for r in results] == [Outcome.DONE] and not dlq.letters
    assert sorted(stack.emails(to), key=lambda e: e["subject"]) == [
        {"from": stack.names.sender_email, "to": [to], "subject": "How was your order o-101?",
         "body": "Hello,\n\nHow do you like what you ordered in o-101?\n\n  Kettle\n  Mug\n\n"
                 "A short review helps other customers choose. Thank you!\n"},
        {"from": stack.names.sender_email, "to": [to], "subject": "Your order o-101 has been delivered",
         "body": "Hello,\n\nYour order o-101 has been delivered. We hope you enjoy it.\n\nItems:\n  1 x Kettle\n  3 x Mug\n\n"
                 "If anything is wrong with your order, just reply to this email.\n"},
    ]
    assert stack.calls["SendEmail"] == 2, "one SendEmail per email"


def test_resaving_a_shipped_order_sends_no_second_email(stack):
    to = f"cy-{uuid.uuid4().hex[:6]}@example.com"
    processing = order("o-102", "processing", email=to)
    shipped = {**processing, "status": "shipped", "tracking_number": "1Z7"}
    resaved = {**shipped, "updated_at": "2024-07-16T09:00:00+00:00"}
    t = stack.names.orders_table
    pipeline, dlq = stack.pipeline()
    results = pipeline.process([kcl_record(doc("MODIFY", shipped, processing, table=t), sequence_number(1)),
                                kcl_record(doc("MODIFY", resaved, shipped, table=t), sequence_number(2))], "shard-0")
    assert [r.outcome for r in results] == [Outcome.DONE, Outcome.DONE] and not dlq.letters
    assert [e["subject"] for e in stack.emails(to)] == ["Your order o-102 has shipped"]
    assert stack.inventory()["p-1"] == {"reserved": Decimal(-2), "on_hand": Decimal(-2), "shipped": Decimal(2)}


def test_no_address_no_email_and_a_refused_address_fails_alone(stack):
    good = f"dee-{uuid.uuid4().hex[:6]}@example.com"
    batch = [
        modify(order("o-103", "processing", email=good), status="shipped", tracking_number="1Z1"),
        modify(order("o-104", "processing", email="nobody@"), status="shipped"),  # SES: missing domain
        modify(order("o-105", "processing", email=None), status="shipped"),  # no address: skipped
    ]
    notification.send_shipped(batch[0], stack.ctx)
    with pytest.raises(ClientError) as refused:
        notification.send_shipped(batch[1], stack.ctx)
    notification.send_shipped(batch[2], stack.ctx)
    assert not is_retryable(refused.value), "a refused address is dead-lettered"
    assert [e["subject"] for e in stack.emails(good)] == ["Your order o-103 has shipped"]
    assert stack.calls["SendEmail"] == 2


# ---------------------------------------------------------------------------------------------
# Inventory


def movements(record):
    return {p: {k: int(v) for k, v in c.items()} for p, c in inventory.movements(record).items()}


TWO = (("p-1", "Kettle", 2, "39.90"), ("p-2", "Mug", 1, "8.99"))


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        ("processing", "shipped", {"p-1": {"reserved": -2, "on_hand": -2, "shipped": 2}, "p-2": {"reserved": -1, "on_hand": -1, "shipped": 1}}),
        ("pending", "shipped", {"p-1": {"reserved": -2, "on_hand": -2, "shipped": 2}, "p-2": {"reserved": -1, "on_hand": -1, "shipped": 1}}),
        (None, "shipped", {"p-1": {"on_hand": -2, "shipped": 2}, "p-2": {"on_hand": -1, "shipped": 1}}),
        ("cancelled", "shipped", {"p-1": {"on_hand": -2, "shipped": 2}, "p-2": {"on_hand": -1, "shipped": 1}}),
        ("delivered", "shipped", {}),
        ("pending", "cancelled", {"p-1": {"reserved": -2}, "p-2": {"reserved": -1}}),
        ("processing", "cancelled", {"p-1": {"reserved": -2}, "p-2": {"reserved": -1}}),
        ("shipped", "cancelled", {"p-1": {"on_hand": 2, "shipped": -2}, "p-2": {"on_hand": 1, "shipped": -1}}),
        ("delivered", "cancelled", {}),
        (None, "cancelled", {}),
        ("shipped", "shipped", {}),
        ("pending", "processing", {}),
    ],
)
def test_inventory_model(before, after, expected):
    if before is None:
        record = insert(order("o-1", after, items=TWO))
    else:
        record = modify(order("o-1", before, items=TWO), status=after)
    assert movements(record) == expected


def test_shipping_with_changed_items_releases_the_old_reservation_and_ships_the_new_lines():
    before = order("o-1", "processing", items=(("p-1", "Kettle", 2, "39.90"),))
    record = change("MODIFY", {**order("o-1", "shipped", items=(("p-1", "Kettle", 1, "39.90"),))}, before)
    assert movements(record) == {"p-1": {"reserved": -2, "on_hand": -1, "shipped": 1}}


def test_inventory_settles_atomically_per_change_and_restores_on_cancel(stack):
    stack.aws.dynamodb.put_item(TableName=stack.names.inventory_table,
                                Item={"product_id": {"S": "p-1"}, "on_hand": {"N": "10"}, "reserved": {"N": "5"}})
    two_lines_same_product = (("p-1", "Kettle", 2, "39.90"), ("p-2", "Mug", 1, "8.99"), ("p-1", "Kettle", 1, "39.90"))
    shipped = modify(order("o-200", "processing", items=two_lines_same_product), status="shipped")
    released = modify(order("o-201", "pending", items=(("p-1", "Kettle", 1, "39.90"),)), status="cancelled")
    returned = modify(order("o-202", "shipped", items=(("p-2", "Mug", 1, "8.99"),)), status="cancelled")
    result = stack.apply("inventory.shipped", [shipped, released, returned])
    assert (result.done, result.failed) == ([0, 1, 2], {})
    assert stack.inventory() == {
        # 10 on hand, 5 reserved; 3 ship (reservation consumed), 1 reservation released
        "p-1": {"on_hand": Decimal(7), "reserved": Decimal(1), "shipped": Decimal(3)},
        # 1 ships, then another order's 1 comes back: summed in one transaction, the net 0
        # of on_hand and shipped is not written (an absent counter reads as 0)
        "p-2": {"reserved": Decimal(-1)},
    }
    assert stack.calls == Counter({"TransactWriteItems": 1}), "the three changes and their markers: one transaction"
    again = stack.apply("inventory.shipped", [shipped, released, returned])
    assert again.duplicate == [0, 1, 2] and stack.inventory()["p-1"]["on_hand"] == 7, "a redelivery moves nothing"


def test_inventory_bad_order_data_fails_alone_and_a_conflict_is_retried(stack):
    bad = order("o-211", "processing")
    bad["items"][0]["quantity"] = "two"
    batch = [modify(order("o-210", "processing"), status="shipped"), modify(bad, status="shipped")]
    result = stack.apply("inventory.shipped", batch)
    assert result.done == [0] and list(result.failed) == [1] and isinstance(result.failed[1], OrderDataError)
    assert stack.inventory()["p-1"] == {"on_hand": Decimal(-2), "reserved": Decimal(-2), "shipped": Decimal(2)}

    def conflict(n, kwargs, real):
        raise ClientError({"Error": {"Code": "TransactionCanceledException", "Message": "x"},
                           "CancellationReasons": [{"Code": "TransactionConflict"}, {"Code": "None"}]},
                          "TransactWriteItems")

    inject(stack, "dynamodb", "transact_write_items", conflict)
    result = stack.apply("inventory.shipped", [modify(order("o-212", "processing"), status="shipped")])
    assert list(result.failed) == [0] and isinstance(result.failed[0], RetryableError), "a conflict is retried"


# ---------------------------------------------------------------------------------------------
# Refunds (SQS)


def test_cancellations_become_refund_requests_ten_per_call(stack):
    batch = [
        modify(order(f"o-3{i:02d}", "processing", items=(("p-1", "Kettle", 1, "100.10"),)), status="cancelled",
               cancel_reason=f"reason {i}", created_us=1_721_037_600_000_000 + i)
        for i in range(12)
    ]
    refunds.request_refunds(batch, stack.ctx)
    assert stack.calls["SendMessageBatch"] == 2
    messages = sorted(stack.refund_messages(), key=lambda m: m["order_id"])
    assert messages[0] == {
        "order_id": "o-300",
        "amount": "100.10",  # the exact decimal, as a string
        "currency": "USD",
        "reason": "reason 0",
        "customer_id": "c-0001",
        "previous_status": "processing",
        "cancelled_at": "2024-07-15T10:00:00.000000Z",
        "dedup_key": "o-300:1721037600000000",
    }
    assert [m["order_id"] for m in messages] == [f"o-3{i:02d}" for i in range(12)]


def test_refund_entries_refused_by_sqs_are_reported_by_index(stack):
    def refuse(n, kwargs, real):
        refused = {"3": (False, "InternalError"), "11": (True, "InvalidMessageContents")}
        kept = [e for e in kwargs["Entries"] if e["Id"] not in refused]
        reply = real(**{**kwargs, "Entries": kept}) if kept else {"Successful": []}
        reply["Failed"] = [{"Id": e["Id"], "SenderFault": refused[e["Id"]][0], "Code": refused[e["Id"]][1], "Message": "no"}
                           for e in kwargs["Entries"] if e["Id"] in refused]
        return reply

    inject(stack, "sqs", "send_message_batch", refuse)
    batch = [modify(order(f"o-4{i:02d}", "pending"), status="cancelled") for i in range(12)]
    batch[7] = modify(order("o-407", "pending", total=None), status="cancelled")  # no amount: cannot refund
    with pytest.raises(PartialBatchFailure) as failed:
        refunds.request_refunds(batch, stack.ctx)
    errors = failed.value.failures
    assert sorted(errors) == [3, 7, 11]
    assert isinstance(errors[3], RetryableError)
    assert isinstance(errors[11], PermanentError)
    assert isinstance(errors[7], OrderDataError) and not is_retryable(errors[7])
    assert sorted(m["order_id"] for m in stack.refund_messages()) == sorted(
        f"o-4{i:02d}" for i in range(12) if i not in (3, 7, 11))


# ---------------------------------------------------------------------------------------------
# Metrics


def test_metrics_follow_an_order_through_edit_cancel_and_remove(stack):
    created = order("o-500", items=(("p-1", "Kettle", 2, "39.90"), ("p-2", "Mug", 1, "8.99")))
    edited = order("o-500", items=(("p-1", "Kettle", 1, "39.90"), ("p-3", "Tin", 3, "12.00")))
    cancelled = {**edited, "status": "cancelled", "cancel_reason": "changed mind"}

    stack.apply("metrics.aggregates", [insert(created)])
    assert stack.order_metrics() == {DAY: {"order_count": 1, "revenue": Decimal("88.79")}}
    assert stack.product_metrics() == {
        ("p-1", DAY): {"units": 2, "revenue": Decimal("79.80")},
        ("p-2", DAY): {"units": 1, "revenue": Decimal("8.99")},
    }

    stack.apply("metrics.aggregates", [change("MODIFY", edited, created)])  # items changed: new - old
    assert stack.order_metrics() == {DAY: {"order_count": 1, "revenue": Decimal("75.90")}}
    assert stack.product_metrics() == {
        ("p-1", DAY): {"units": 1, "revenue": Decimal("39.90")},
        ("p-2", DAY): {"units": 0, "revenue": Decimal("0.00")},
        ("p-3", DAY): {"units": 3, "revenue": Decimal("36.00")},
    }

    stack.apply("metrics.aggregates", [change("MODIFY", cancelled, edited)])  # the order's sales leave
    assert stack.order_metrics() == {DAY: {"order_count": 0, "revenue": Decimal("0.00"), "cancelled_count": 1}}
    assert all(v == {"units": 0, "revenue": 0} for v in stack.product_metrics().values())

    stack.calls.clear()
    stack.apply("metrics.aggregates", [remove(cancelled)])  # deleting the cancelled order: not a cancellation any more
    assert stack.order_metrics() == {DAY: {"order_count": 0, "revenue": Decimal("0.00"), "cancelled_count": 0}}
    assert stack.calls == Counter({"TransactWriteItems": 1}), "product rows had nothing left to change"


def test_removing_a_live_order_subtracts_it_and_a_status_edit_writes_nothing(stack):
    live = order("o-510", "processing", created_at="2024-07-16T23:59:59.999999Z")
    stack.apply("metrics.aggregates", [insert(live), modify(live, status="shipped")])
    assert stack.order_metrics() == {"2024-07-16": {"order_count": 1, "revenue": Decimal("79.80")}}
    stack.calls.clear()
    stack.apply("metrics.aggregates", [modify(live, status="shipped", updated_at="2024-07-17T00:00:00Z")])
    assert stack.calls == Counter(), "no delta, no call"
    stack.apply("metrics.aggregates", [remove(live)])
    assert stack.order_metrics() == {"2024-07-16": {"order_count": 0, "revenue": Decimal("0.00")}}
    assert stack.product_metrics() == {("p-1", "2024-07-16"): {"units": 0, "revenue": Decimal("0.00")}}


def test_metrics_sum_a_batch_in_memory_first(stack):
    products = [("p-1", "Kettle", "39.90"), ("p-2", "Mug", "8.99"), ("p-3", "Tin", "12.00")]
    batch = []
    for i in range(300):
        p, name, price = products[i % 3]
        day = "2024-07-15" if i < 200 else "2024-07-16"
        batch.append(insert(order(f"o-6{i:03d}", items=((p, name, 1 + i % 2, price),), created_at=f"{day}T12:00:00Z")))
    stack.apply("metrics.aggregates", batch)
    # 8 counters (3 products x 2 days + 2 days) + 92 markers per transaction: 300 changes in 4
    assert stack.calls == Counter({"TransactWriteItems": 4})
    assert stack.calls.total() / len(batch) <= 0.1
    expected_orders: dict[str, dict] = {}
    expected_products: dict[tuple, dict] = {}
    for r in batch:
        n = r.new_image
        d = n["created_at"][:10]
        e = expected_orders.setdefault(d, {"order_count": 0, "revenue": Decimal(0)})
        e["order_count"] += 1
        e["revenue"] += n["total"]
        line = n["items"][0]
        pe = expected_products.setdefault((line["product_id"], d), {"units": 0, "revenue": Decimal(0)})
        pe["units"] += line["quantity"]
        pe["revenue"] += line["quantity"] * line["unit_price"]
    assert stack.order_metrics() == expected_orders
    assert stack.product_metrics() == expected_products


def test_bad_order_data_fails_alone_and_an_undated_order_is_not_counted(stack):
    bad = order("o-701")
    bad["items"][0]["quantity"] = "two"
    batch = [insert(order("o-700")), insert(bad), insert(order("o-702", created_at=None))]
    result = stack.apply("metrics.aggregates", batch)
    assert result.done == [2, 0] and list(result.failed) == [1], "the undated order has nothing to commit"
    assert isinstance(result.failed[1], OrderDataError)
    assert stack.order_metrics() == {DAY: {"order_count": 1, "revenue": Decimal("79.80")}}


def test_a_failed_metrics_write_fails_the_changes_committed_together(stack):
    """The sums mix every change of a transaction, so all of them are retried together."""
    def throttle(n, kwargs, real):
        raise ClientError({"Error": {"Code": "ProvisionedThroughputExceededException", "Message": "slow down"}},
                          "TransactWriteItems")

    inject(stack, "dynamodb", "transact_write_items", throttle)
    result = stack.apply("metrics.aggregates", [insert(order("o-710")), insert(order("o-711"))])
    assert list(result.failed) == [0, 1] and all(is_retryable(e) for e in result.failed.values())
    assert stack.order_metrics() == {}


# ---------------------------------------------------------------------------------------------
# The ProductOrders view


def pos(n: int) -> Position:
    return Position("shardId-000000000000", sequence_number(n))


def test_view_rows_follow_insert_modify_and_remove(stack):
    created = order("o-800", items=(("p-1", "Kettle", 2, "39.90"), ("p-2", "Mug", 1, "8.99")))
    views.product_orders([insert(created, created_us=1_000_000_000_000_001)], stack.ctx)
    assert stack.view() == {
        ("p-1", "o-800"): {"quantity": 2, "unit_price": Decimal("39.90"), "amount": Decimal("79.80"),
                           "product_name": "Kettle", "order_created_at": CREATED_AT,
                           "customer_id": "c-0001", "currency": "USD", "source_created_us": 1_000_000_000_000_001,
                           "source_sequence": ""},
        ("p-2", "o-800"): {"quantity": 1, "unit_price": Decimal("8.99"), "amount": Decimal("8.99"),
                           "product_name": "Mug", "order_created_at": CREATED_AT,
                           "customer_id": "c-0001", "currency": "USD", "source_created_us": 1_000_000_000_000_001,
                           "source_sequence": ""},
    }

    edited = order("o-800", "processing", items=(("p-1", "Kettle", 3, "39.90"), ("p-3", "Tin", 1, "12.00")))
    views.product_orders([change("MODIFY", edited, created, created_us=1_000_000_000_000_002)], stack.ctx)
    rows = stack.view()
    assert {k: (r.get("quantity"), r.get("deleted")) for k, r in rows.items()} == {
        ("p-1", "o-800"): (3, None),
        ("p-2", "o-800"): (None, True),  # tombstone
        ("p-3", "o-800"): (1, None),
    }
    assert rows["p-2", "o-800"] == {"deleted": True, "source_created_us": 1_000_000_000_000_002, "source_sequence": "",
                                    "expires_at": 1_000_000_000 + 7 * 24 * 3600}

    views.product_orders([remove(edited, created_us=1_000_000_000_000_003)], stack.ctx)
    assert {k: (r.get("deleted"), r["source_created_us"]) for k, r in stack.view().items()} == {
        ("p-1", "o-800"): (True, 1_000_000_000_000_003),
        ("p-2", "o-800"): (True, 1_000_000_000_000_002),  # retired by the MODIFY already
        ("p-3", "o-800"): (True, 1_000_000_000_000_003),
    }


def test_a_status_change_writes_nothing_and_an_item_edit_rewrites_its_rows_in_one_transaction(stack):
    created = order("o-810", items=TWO)
    views.product_orders([insert(created)], stack.ctx)
    assert stack.calls == Counter({"TransactWriteItems": 1}), "both rows' conditional puts in one call"
    stack.calls.clear()
    views.product_orders([modify(created, updated_at="2024-07-15T11:00:00+00:00")], stack.ctx)
    views.product_orders([modify(created, status="processing")], stack.ctx)
    assert stack.calls == Counter(), "a row holds no status: neither change touches the view"
    edited = order("o-810", "processing", items=(("p-1", "Kettle", 5, "39.90"), ("p-2", "Mug", 1, "8.99")))
    views.product_orders([modify(created, items=edited["items"], total=edited["total"])], stack.ctx)
    assert stack.calls == Counter({"PutItem": 1}), "only the changed row; a lone row is a plain conditional put"
    assert {k: r["quantity"] for k, r in stack.view().items()} == {("p-1", "o-810"): 5, ("p-2", "o-810"): 1}


def test_the_puts_of_many_changes_share_transactions_and_stale_rows_are_dropped_from_them(stack):
    orders = [order(f"o-85{n}", items=TWO) for n in range(60)]  # 120 rows: two transactions
    views.product_orders([insert(o, created_us=5_000_000_000_000_010) for o in orders], stack.ctx)
    assert stack.calls == Counter({"TransactWriteItems": 2})
    stack.calls.clear()
    edited = [modify(o, items=[{**o["items"][0], "quantity": Decimal(7)}, o["items"][1]],
                     created_us=5_000_000_000_000_020 if n % 2 else 5_000_000_000_000_001)  # odd: newer; even: stale
              for n, o in enumerate(orders)]
    views.product_orders(edited, stack.ctx)  # no error: a stale row is not a failure
    assert stack.calls == Counter({"TransactWriteItems": 2}), "cancelled once for its stale rows, sent again without them"
    quantities = {k[1]: r["quantity"] for k, r in stack.view().items() if k[0] == "p-1"}
    assert quantities == {o["order_id"]: (7 if n % 2 else 2) for n, o in enumerate(orders)}


def test_stale_and_duplicated_changes_do_not_touch_the_view(stack):
    created = order("o-820", items=TWO)
    processing = {**created, "status": "processing", "items": [{**line, "quantity": Decimal(3)} for line in created["items"]]}
    first = insert(created, created_us=2_000_000_000_000_001)
    second = change("MODIFY", processing, created, created_us=2_000_000_000_000_002)
    views.product_orders([second], stack.ctx)  # arrives first (reordered)
    after_second = stack.view()
    views.product_orders([first, second], stack.ctx)  # the older one, then a duplicate: both stale, no error
    assert stack.view() == after_second
    assert {r["quantity"] for r in after_second.values()} == {3}


def test_a_removed_order_is_not_brought_back_by_a_late_duplicate(stack):
    created = order("o-830", items=TWO)
    first = insert(created, created_us=3_000_000_000_000_001)
    views.product_orders([first, remove(created, created_us=3_000_000_000_000_002)], stack.ctx)
    views.product_orders([first], stack.ctx)  # KDS delivered the insert again
    assert all(r.get("deleted") for r in stack.view().values()) and len(stack.view()) == 2


def test_changes_in_the_same_microsecond_are_ordered_by_sequence_number(stack):
    created = order("o-840", items=(("p-1", "Kettle", 1, "39.90"),))
    processing = {**created, "status": "processing", "items": [{**created["items"][0], "quantity": Decimal(2)}]}
    us = 4_000_000_000_000_000  # millisecond-precision streams give both the same time
    views.product_orders([insert(created, created_us=us, position=pos(9))], stack.ctx)
    views.product_orders([change("MODIFY", processing, created, created_us=us, position=pos(10))], stack.ctx)
    views.product_orders([insert(created, created_us=us, position=pos(9))], stack.ctx)  # stale
    [row] = stack.view().values()
    assert row["quantity"] == 2
    assert row["source_sequence"].endswith(f"{sequence_number(10)}:0000000000")


# ---------------------------------------------------------------------------------------------
# Audit and analytics on one Firehose stream


def test_audit_entries_diff_every_attribute_and_say_who(stack):
    created = order("o-900", items=(("p-1", "Kettle", 1, "19.990"),), note="gift")
    edited = {k: v for k, v in created.items() if k != "note"}
    edited.update(status="processing", coupon="SUMMER")
    records = [
        insert(created, created_us=1_721_037_600_000_001, position=pos(1)),
        change("MODIFY", edited, created, created_us=1_721_037_600_000_002, position=pos(2)),
        remove(edited, created_us=1_721_037_600_000_003, ttl=True, position=pos(3)),
    ]
    audit.firehose_audit(records, stack.ctx)
    entries = [e for e in stack.firehose_lines() if e["record_type"] == "audit"]
    assert [(e["event"], e["who"]) for e in entries] == [("INSERT", "application"), ("MODIFY", "application"), ("REMOVE", "ttl")]
    assert entries[0]["diff"]["added"]["items"] == [
        {"product_id": "p-1", "name": "Kettle", "quantity": 1, "unit_price": Decimal("19.990")}]
    assert str(entries[0]["diff"]["added"]["items"][0]["unit_price"]) == "19.990", "numbers stay exact"
    assert entries[1] == {
        "record_type": "audit",
        "table": "Orders",
        "keys": {"order_id": "o-900"},
        "item_key": "order_id=o-900",
        "event": "MODIFY",
        "event_id": records[1].event_id,
        "created_at": "2024-07-15T10:00:00.000002Z",
        "created_us": 1_721_037_600_000_002,
        "who": "application",
        "position": {"shard_id": "shardId-000000000000", "sequence_number": sequence_number(2), "sub_sequence_number": 0},
        "diff": {"added": {"coupon": "SUMMER"}, "removed": {"note": "gift"},
                 "changed": {"status": {"old": "pending", "new": "processing"}}},
    }
    assert entries[2]["diff"]["removed"].keys() == edited.keys() and entries[2]["diff"]["added"] == {}


def test_analytics_and_audit_share_the_stream_and_are_told_apart(stack):
    records = [insert(order("o-910")), modify(order("o-910"), status="processing")]
    analytics.firehose_copy(records, stack.ctx)
    audit.firehose_audit(records, stack.ctx)
    kinds = Counter((e["record_type"], e["keys"]["order_id"]) for e in stack.firehose_lines())
    assert kinds == Counter({("analytics", "o-910"): 2, ("audit", "o-910"): 2})
    assert stack.calls == Counter({"PutRecordBatch": 2})


def test_firehose_batches_are_chunked_and_failures_mapped_to_their_change(stack):
    def fail_some(n, kwargs, real):
        if n == 3:
            raise ClientError({"Error": {"Code": "ServiceUnavailableException", "Message": "down"},
                               "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutRecordBatch")
        if n != 2:
            return real(**kwargs)
        records = kwargs["Records"]
        reply = real(**{**kwargs, "Records": records[:3] + records[4:]})  # the 4th is refused
        reply["FailedPutCount"] = 1
        reply["RequestResponses"].insert(3, {"ErrorCode": "ServiceUnavailableException", "ErrorMessage": "busy"})
        return reply

    faulty = inject(stack, "firehose", "put_record_batch", fail_some)
    records = [insert(order(f"o-92{i}")) for i in range(3)]
    many = records * 401  # 1203 changes -> 500 + 500 + 203
    with pytest.raises(PartialBatchFailure) as failed:
        analytics.firehose_copy(many, stack.ctx)
    assert faulty.calls == 3
    assert sorted(failed.value.failures) == [503, *range(1000, 1203)]
    assert all(is_retryable(e) for e in failed.value.failures.values())
    assert len(stack.firehose_lines()) == 999


def test_chunks_respect_the_byte_limit():
    lines = [b"x" * (1024 * 1024)] * 9
    assert [len(r) for r in _firehose.chunks(lines)] == [4, 4, 1]
    assert [len(r) for r in _firehose.chunks([b"x\n"] * 1001)] == [500, 500, 1]
    assert list(_firehose.chunks([])) == []


def test_an_oversized_audit_entry_keeps_the_attribute_names():
    big = order("o-930", blob="y" * 600_000)
    line = audit.to_line(change("MODIFY", {**big, "blob": "z" * 600_000}, big))
    entry = orjson.loads(line)
    assert len(line) < _firehose.MAX_RECORD_BYTES
    assert entry["truncated"] is True and entry["diff"]["changed"] == {"blob": None}


# ---------------------------------------------------------------------------------------------
# Everything together, through the pipeline


def test_two_order_lives_through_the_pipeline(stack):
    to = f"eve-{uuid.uuid4().hex[:6]}@example.com"
    t = stack.names.orders_table
    a0 = order("o-a", items=TWO, email=to)
    a1 = {**a0, "status": "processing"}
    a2 = {**a1, "status": "shipped", "tracking_number": "1Z5"}
    a3 = {**a2, "status": "delivered"}
    b0 = order("o-b", items=(("p-2", "Mug", 4, "8.99"),), email=to)
    b1 = {**b0, "status": "cancelled", "cancel_reason": "too slow"}
    docs = [doc("INSERT", a0, table=t), doc("INSERT", b0, table=t), doc("MODIFY", a1, a0, table=t),
            doc("MODIFY", b1, b0, table=t), doc("MODIFY", a2, a1, table=t), doc("MODIFY", a3, a2, table=t)]
    pipeline, dlq = stack.pipeline()
    results = pipeline.process([kcl_record(d, sequence_number(i)) for i, d in enumerate(docs, 1)], "shardId-000000000000")
    assert [r.outcome for r in results] == [Outcome.DONE] * 6 and not dlq.letters

    assert sorted(e["subject"] for e in stack.emails(to)) == [
        "How was your order o-a?", "Your order o-a has been delivered", "Your order o-a has shipped"]
    [refund] = stack.refund_messages()
    assert (refund["order_id"], refund["amount"], refund["reason"]) == ("o-b", "35.96", "too slow")
    assert stack.inventory() == {
        "p-1": {"reserved": -2, "on_hand": -2, "shipped": 2},
        "p-2": {"reserved": -5, "on_hand": -1, "shipped": 1},  # o-a's 1 shipped, o-b's 4 released
    }
    assert stack.order_metrics() == {DAY: {"order_count": 1, "revenue": Decimal("88.79"), "cancelled_count": 1}}
    assert stack.product_metrics() == {("p-1", DAY): {"units": 2, "revenue": Decimal("79.80")},
                                       ("p-2", DAY): {"units": 1, "revenue": Decimal("8.99")}}
    view = stack.view()
    assert {k: (r.get("quantity"), r.get("deleted")) for k, r in view.items()} == {
        ("p-1", "o-a"): (2, None), ("p-2", "o-a"): (1, None), ("p-2", "o-b"): (4, None)}
    lines = stack.firehose_lines()
    assert Counter(e["record_type"] for e in lines) == Counter({"analytics": 6, "audit": 6})


def test_orders_missing_optional_fields_are_not_dead_lettered(stack):
    """Bare {order_id, status} items (as other tests and tools write them) flow through."""
    t = stack.names.orders_table
    docs = [doc("INSERT", {"order_id": "o-x", "status": "pending"}, table=t),
            doc("MODIFY", {"order_id": "o-x", "status": "shipped"}, {"order_id": "o-x", "status": "pending"}, table=t),
            doc("REMOVE", None, {"order_id": "o-x", "status": "shipped"}, table=t)]
    pipeline, dlq = stack.pipeline()
    results = pipeline.process([kcl_record(d, sequence_number(i)) for i, d in enumerate(docs, 1)], "shardId-000000000000")
    assert [r.outcome for r in results] == [Outcome.DONE] * 3 and not dlq.letters
    assert stack.calls["SendEmail"] == 0 and stack.inventory() == {} and stack.order_metrics() == {}


def test_demo_order_histories_leave_every_derived_table_consistent(stack):
    """The local demo's order histories, in batches: what the tables say equals what the
    final orders imply, recomputed independently."""
    from orders_cdc.local.orders import OrderDemo

    demo, state, docs = OrderDemo(seed=5, cancel_rate=0.3), {}, []
    for _ in range(150):
        _, item = demo.step()
        old = state.get(item["order_id"])
        docs.append(doc("MODIFY" if old else "INSERT", item, old, table=stack.names.orders_table))
        state[item["order_id"]] = item
    pipeline, dlq = stack.pipeline()
    for start in range(0, len(docs), 40):
        results = pipeline.process([kcl_record(d, sequence_number(start + i)) for i, d in enumerate(docs[start:start + 40])],
                                   "shardId-000000000000")
        assert {r.outcome for r in results} == {Outcome.DONE}
    assert not dlq.letters

    finals = list(state.values())
    expected_days: dict[str, Counter] = {}
    for item in finals:
        day = expected_days.setdefault(item["created_at"][:10], Counter())
        if item["status"] == "cancelled":
            day["cancelled_count"] += 1
        else:
            day["order_count"] += 1
            day["revenue"] += item["total"]
    assert {d: {k: v for k, v in m.items() if v} for d, m in stack.order_metrics().items()} == \
        {d: dict(c) for d, c in expected_days.items()}
    assert {k: r["quantity"] for k, r in stack.view().items() if not r.get("deleted")} == {
        (line["product_id"], item["order_id"]): line["quantity"] for item in finals for line in item["items"]}
    left = [item for item in finals if item["status"] in ("shipped", "delivered")]
    shipped = Counter()
    for item in left:
        for line in item["items"]:
            shipped[line["product_id"]] += line["quantity"]
    assert {p: r["shipped"] for p, r in stack.inventory().items() if r.get("shipped")} == dict(shipped)
    cancelled = [item for item in finals if item["status"] == "cancelled"]
    assert len(stack.refund_messages()) == len(cancelled)
    assert stack.calls["SendEmail"] == len(left) + 2 * sum(item["status"] == "delivered" for item in finals)


def test_an_item_that_flattens_past_a_firehose_record_is_sent_truncated_without_building_it_whole():
    """Every leaf repeats its whole path: 5,000 leaves under a 4,000-character path is a
    ~60 KB item that flattened to 20 MB (a 250 KB item reached 300 MB). Flattening stops at
    Firehose's record size and the event says it was truncated."""
    deep: dict = {f"k{i}": "v" for i in range(5000)}
    for level in range(40):
        deep = {f"{'m' * 98}{level:02d}": deep}
    big = {**order("o-990"), "extra": deep}
    event = analytics.to_event(insert(big))
    line = orjson.dumps(event, default=str)
    assert event["item_truncated"] is True and len(line) <= _firehose.MAX_RECORD_BYTES
    assert event["item"]["order_id"] == "o-990" and "extra" not in event["item"]
    small = analytics.to_event(insert(order("o-991")))
    assert "item_truncated" not in small and small["item"]["items.0.product_id"] == "p-1"
